"""Text generation from a text-generation artifact, torch-free (numpy, onnxruntime, tokenizers;
jinja2 only to apply a chat template).

    lm = graphopt.load("dist/smollm2-gen")
    lm.generate("The capital of France is", max_new_tokens=20)            # -> str
    for piece in lm.generate("Tell me a story", stream=True): print(piece, end="")

The artifact's one graph serves the prompt (all prompt tokens at once) and every decode step
(one token per row). Its KV cache is one preallocated buffer per layer and kind that each
step writes its keys and values into in place (graphopt.generation_steps: ONNX Runtime I/O
binding, or the TVM library's in-place attention): no copy of the cache per token.
Prompts of different lengths run as one batch, right-padded, each row at its own position.
"""
from __future__ import annotations

import gzip
import os
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np

from .errors import ArtifactError, GraphoptError
from .generation_steps import steps_for

TASK = "text-generation"


@dataclass
class GenerationStats:
    """Counts and times of the last generate call (seconds)."""

    prompt_tokens: int = 0
    prompt_seconds: float = 0.0
    new_tokens: int = 0
    decode_seconds: float = 0.0     # the decode steps after the first new token
    first_token_seconds: float = 0.0

    @property
    def prompt_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds else float("nan")

    @property
    def decode_tokens_per_second(self) -> float:
        steps = self.new_tokens - 1
        return steps / self.decode_seconds if steps > 0 and self.decode_seconds else float("nan")

    def line(self) -> str:
        return (f"prompt: {self.prompt_tokens} tokens, {self.prompt_tokens_per_second:.1f} tokens/s; "
                f"generated: {self.new_tokens} tokens, {self.decode_tokens_per_second:.1f} tokens/s; "
                f"time to first token: {self.first_token_seconds * 1e3:.1f} ms")


@dataclass
class Sampler:
    """Greedy when temperature == 0; otherwise softmax(logits / temperature) restricted to the
    top_k tokens (0: all) and to the smallest set whose probability reaches top_p."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    rng: Any = field(init=False, repr=False)

    def __post_init__(self):
        if not self.temperature >= 0:
            raise GraphoptError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise GraphoptError(f"top_k must be >= 0 (0: no limit), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise GraphoptError(f"top_p must be in (0, 1], got {self.top_p}")
        self.rng = np.random.default_rng(self.seed)

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        """logits [B, V] -> token ids [B]."""
        if self.temperature == 0:
            return logits.argmax(-1)
        out = np.empty(logits.shape[0], dtype=np.int64)
        for row, values in enumerate(logits.astype(np.float64) / self.temperature):
            order = np.argsort(-values)
            if self.top_k:
                order = order[: self.top_k]
            probs = np.exp(values[order] - values[order[0]])
            probs /= probs.sum()
            if self.top_p < 1:
                keep = int(np.searchsorted(np.cumsum(probs), self.top_p) + 1)
                order, probs = order[:keep], probs[:keep] / probs[:keep].sum()
            out[row] = order[self.rng.choice(len(order), p=probs)]
        return out


class _TextStream:
    """Token ids -> text pieces. Each piece is the new text of decode(ids) since the last one
    (decoding from a few tokens back, so a word's leading space and multi-byte characters come
    out whole); text that could still become a stop string is held back."""

    def __init__(self, tokenizer, stops: Sequence[str]):
        self.tokenizer = tokenizer
        self.stops = list(stops)
        self.ids: list[int] = []
        self.prefix = self.read = 0
        self.text = ""          # decoded so far
        self.emitted = 0        # characters of text already handed out
        self.stopped = False

    def _decode(self, ids):
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token: int) -> str:
        self.ids.append(int(token))
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before):]
            self.prefix, self.read = self.read, len(self.ids)
        for stop in self.stops:
            at = self.text.find(stop, max(0, self.emitted - len(stop)))
            if at >= 0:
                self.text, self.stopped = self.text[:at], True
        hold = 0 if self.stopped else max((len(s) - 1 for s in self.stops), default=0)
        return self._take(len(self.text) - hold)

    def finish(self) -> str:
        if not self.stopped:
            tail = self._decode(self.ids[self.prefix:])
            done = self._decode(self.ids[self.prefix:self.read])
            if len(tail) > len(done):
                self.text += tail[len(done):]
        return self._take(len(self.text))

    def _take(self, upto: int) -> str:
        if upto <= self.emitted:
            return ""
        piece, self.emitted = self.text[self.emitted:upto], upto
        return piece


class TextGenerator:
    """The generation runtime of one artifact: its step runner (graphopt.generation_steps: the
    onnxruntime session or the TVM library), its tokenizer and the manifest's task section
    (layers, cache shape, special tokens, chat template)."""

    def __init__(self, task: dict, runner, tokenizer=None, backend: str = "onnxruntime"):
        self.task = task
        self._tokenizer = tokenizer
        self.layers = int(self.task["layers"])
        self.kv_heads, self.head_dim = int(self.task["kv_heads"]), int(self.task["head_dim"])
        self.max_positions = int(self.task["max_positions"])
        self.vocab_size = int(self.task["vocab_size"])
        self.cache_dtype = np.dtype(self.task.get("cache_dtype", "float32"))
        self.eos = set(int(t) for t in self.task.get("eos_token_ids", []))
        self.pad = int(self.task.get("pad_token_id") or 0)
        self.stats = GenerationStats()
        self.steps = steps_for(runner, self.layers, self._cache_shape, self.cache_dtype, self.vocab_size)
        if self.steps is None:
            raise ArtifactError(f"text generation runs on onnxruntime and tvm artifacts, this one is {backend}")

    def _cache_shape(self, batch: int, capacity: int) -> tuple[int, int, int, int]:
        return batch, self.kv_heads, capacity, self.head_dim

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            raise GraphoptError("this artifact was compiled without a tokenizer: generate from token ids "
                                "(generate_tokens) or compile with tokenizer=")
        return self._tokenizer

    # ----- text <-> ids
    def encode(self, prompt: str, chat: bool = False) -> list[int]:
        if not isinstance(prompt, str):
            raise GraphoptError(f"a prompt is a str, got {type(prompt).__name__}")
        if chat:
            prompt = self.apply_chat_template(prompt)
        ids = self.tokenizer.encode(prompt, add_special_tokens=not chat).ids
        if not ids:
            raise GraphoptError("the prompt is empty (0 tokens): give at least one token of text")
        return ids

    def apply_chat_template(self, message: str) -> str:
        template = self.task.get("chat_template")
        if not template:
            raise GraphoptError("this artifact's tokenizer has no chat template; generate without chat")
        try:
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError:
            raise GraphoptError("chat templates need jinja2: pip install jinja2") from None
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        return env.from_string(template).render(messages=[{"role": "user", "content": message}],
                                                add_generation_prompt=True,
                                                bos_token=self.task.get("bos_token") or "",
                                                eos_token=self.task.get("eos_token") or "")

    # ----- the loop
    def generate(self, prompt: str | Sequence[str], max_new_tokens: int = 128, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int | None = None, stop: str | Sequence[str] | None = None,
                 stream: bool = False, chat: bool = False):
        """New text for `prompt` (a str), or a list of texts for a list of prompts; with
        stream=True (one prompt) an iterator of text pieces whose concatenation is that text.
        Generation ends at an end-of-sequence token, a stop string (not included in the
        text) or after max_new_tokens."""
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if any(not isinstance(s, str) or not s for s in stops):
            raise GraphoptError("stop strings must be non-empty str")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise GraphoptError("no prompt given")
        rows = [self.encode(p, chat) for p in prompts]
        sampler = Sampler(temperature, top_k, top_p, seed)
        if stream:
            if len(rows) != 1:
                raise GraphoptError(f"stream=True takes one prompt, got {len(rows)}")
            return self._stream(rows[0], max_new_tokens, sampler, stops)
        streams = [_TextStream(self.tokenizer, stops) for _ in rows]
        texts = ["" for _ in rows]
        for step in self.generate_tokens(rows, max_new_tokens, sampler,
                                         done=lambda row: streams[row].stopped):
            for row, token in step.items():
                texts[row] += streams[row].push(token)
        texts = [t + s.finish() for t, s in zip(texts, streams)]
        return texts[0] if isinstance(prompt, str) else texts

    def _stream(self, row: list[int], max_new_tokens: int, sampler: Sampler, stops: list[str]) -> Iterator[str]:
        text = _TextStream(self.tokenizer, stops)
        for step in self.generate_tokens([row], max_new_tokens, sampler, done=lambda _: text.stopped):
            piece = text.push(step[0])
            if piece:
                yield piece
        tail = text.finish()
        if tail:
            yield tail

    def generate_tokens(self, rows: list[list[int]], max_new_tokens: int, sampler: Sampler | None = None,
                        done=lambda row: False, capacity: int | None = None) -> Iterator[dict[int, int]]:
        """Token ids of every row still going, one dict {row: id} per step; `done(row)` ends a
        row early (a stop string). Times and counts land in self.stats."""
        if not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
            raise GraphoptError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        sampler = sampler or Sampler()
        lengths = np.array([len(r) for r in rows], dtype=np.int64)
        if lengths.min() <= 0:
            raise GraphoptError("a prompt is empty (0 tokens)")
        for r in rows:
            bad = [t for t in r if not 0 <= t < self.vocab_size]
            if bad:
                raise GraphoptError(f"token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})")
        longest = int(lengths.max())
        if longest >= self.max_positions:
            raise GraphoptError(f"the prompt has {longest} tokens; this model has {self.max_positions} positions "
                                "(prompt and new tokens must fit)")
        capacity = capacity or min(self.max_positions, longest + max_new_tokens)
        if capacity < longest + 1:
            raise GraphoptError(f"a cache of {capacity} positions cannot hold a {longest}-token prompt and a new token")
        batch = len(rows)
        self.steps.bind(batch, capacity)
        self.stats = stats = GenerationStats(prompt_tokens=int(lengths.sum()))
        ids = np.full((batch, longest), self.pad, dtype=np.int64)
        for b, r in enumerate(rows):
            ids[b, :len(r)] = r
        start = time.perf_counter()
        logits = self.steps.run(ids, np.broadcast_to(np.arange(longest), (batch, longest)), lengths - 1, longest,
                                (lengths - 1).reshape(batch, 1))
        stats.prompt_seconds = time.perf_counter() - start
        going = np.ones(batch, dtype=bool)
        decode_start: float | None = None
        for produced in range(max_new_tokens):
            tokens = sampler(logits[:, 0, :])
            step = {b: int(tokens[b]) for b in range(batch) if going[b]}
            if produced == 0:
                stats.first_token_seconds = time.perf_counter() - start
                decode_start = time.perf_counter()
            stats.new_tokens += 1
            yield step
            for b, token in step.items():
                if token in self.eos or done(b):
                    going[b] = False
            if not going.any() or produced + 1 == max_new_tokens or int(lengths.max()) + 1 > capacity:
                break                   # done, or the cache is full (the model's last position)
            positions = lengths.reshape(batch, 1)
            lengths = lengths + 1
            logits = self.steps.run(np.where(going, tokens, self.pad).reshape(batch, 1), positions, lengths - 1,
                                    int(lengths.max()), np.zeros((batch, 1), dtype=np.int64))
            if decode_start is not None:
                stats.decode_seconds = time.perf_counter() - decode_start

    def next_token_logits(self, ids: np.ndarray) -> np.ndarray:
        """Logits [B, S, V] at every position of full-length rows `ids` [B, S] (one prompt
        call on an empty cache): what perplexity is computed from."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        batch, seq = ids.shape
        positions = np.ascontiguousarray(np.broadcast_to(np.arange(seq), (batch, seq)))
        return self.steps.all_logits(ids, positions, np.full(batch, seq - 1), seq, positions)

    def perplexity(self, windows: Sequence[np.ndarray]) -> float:
        """exp(mean next-token negative log-likelihood) over token windows (each [1, S] or [S])."""
        total, count = 0.0, 0
        for window in windows:
            ids = np.asarray(window, dtype=np.int64).reshape(1, -1)
            logits = self.next_token_logits(ids)[0, :-1].astype(np.float64)
            top = logits.max(-1, keepdims=True)
            logz = np.log(np.exp(logits - top).sum(-1)) + top[:, 0]
            total += float((logz - logits[np.arange(len(logits)), ids[0, 1:]]).sum())
            count += len(logits)
        return float(np.exp(total / count))


def load_tokenizer(directory: str | None, task: dict, files: dict[str, bytes] | None = None):
    """The artifact's tokenizer (tokenizers.Tokenizer), or None if it was compiled without one."""
    name = task.get("tokenizer")
    if not name:
        return None
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise GraphoptError("generating text needs the tokenizers package: pip install tokenizers") from None
    if files is not None:
        data = files[name]
    elif directory is None:
        raise ArtifactError("load_tokenizer needs the artifact's directory or its files")
    else:
        with open(os.path.join(directory, name), "rb") as f:
            data = f.read()
    if name.endswith(".gz"):
        data = gzip.decompress(data)
    return Tokenizer.from_str(data.decode("utf-8"))


def generator_for(directory: str, manifest: dict, runner, files: dict[str, bytes] | None = None) -> TextGenerator:
    task = manifest.get("task")
    if not isinstance(task, dict) or task.get("name") != TASK:
        kind = task.get("name") if isinstance(task, dict) else "a fixed-shape forward pass"
        raise ArtifactError(f"artifact {directory} is {kind}, not a {TASK} artifact: compile it with "
                            f"task='{TASK}' (CLI: --task {TASK}) to generate text")
    return TextGenerator(task, runner, load_tokenizer(directory, task, files), manifest.get("backend", "?"))
