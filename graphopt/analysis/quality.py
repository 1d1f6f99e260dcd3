"""Quality of a language model on text: perplexity, and KL / Jensen-Shannon divergence of
its next-token distributions against a reference model.

Anything that maps input_ids [1, S] to logits [1, S, V] can be evaluated: an eager Hugging
Face model, a captured IR, a CompiledModel or a loaded artifact (see `as_logits_fn`).
Text is cut into non-overlapping windows of `seq_len` tokens; a window's first token has
no prediction, so each window scores seq_len - 1 tokens.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import GraphoptError

LogitsFn = Callable[[torch.Tensor], torch.Tensor]


def token_windows(tokenizer, text: str, seq_len: int, max_tokens: int | None = None) -> list[torch.Tensor]:
    """Non-overlapping [1, seq_len] windows of the tokenized text, at most `max_tokens` in all."""
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    count = ids.numel() // seq_len
    if count == 0:
        raise GraphoptError(f"text has {ids.numel()} tokens, fewer than one window of {seq_len}")
    return [ids[i * seq_len:(i + 1) * seq_len].unsqueeze(0) for i in range(count)]


def as_logits_fn(model: Any) -> LogitsFn:
    """Wrap a model, CompiledModel or LoadedModel so that it returns the logits tensor."""
    def run(ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            out = model(ids)
        if hasattr(out, "logits"):
            out = out.logits
        elif isinstance(out, (tuple, list)):
            out = out[0]
        return torch.as_tensor(out).float()
    return run


@dataclass
class PerplexityResult:
    perplexity: float
    mean_nll: float
    tokens: int
    windows: int

    def to_json(self) -> dict:
        return dict(self.__dict__)


def perplexity(model: Any, windows: list[torch.Tensor], progress: bool = True) -> PerplexityResult:
    run = as_logits_fn(model)
    total_nll, total_tokens = 0.0, 0
    for ids in tqdm(windows, desc="perplexity", unit="window", disable=not progress, leave=False):
        logits = run(ids)
        nll = F.cross_entropy(logits[0, :-1].double(), ids[0, 1:], reduction="sum")
        total_nll += float(nll)
        total_tokens += ids.shape[1] - 1
    mean = total_nll / total_tokens
    return PerplexityResult(math.exp(mean), mean, total_tokens, len(windows))


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    return F.log_softmax(logits.float().reshape(-1, logits.shape[-1]), -1)


def js_divergence(logp: torch.Tensor, logq: torch.Tensor) -> float:
    """Mean over rows of the Jensen-Shannon divergence (nats) of two log-probability rows."""
    log_m = torch.logaddexp(logp, logq) - math.log(2)
    p, q = logp.exp(), logq.exp()
    return float(0.5 * ((p * (logp - log_m)).sum(-1) + (q * (logq - log_m)).sum(-1)).mean())


def next_token_nll(logits: torch.Tensor, ids: torch.Tensor) -> tuple[float, int]:
    """Summed negative log-likelihood of ids[:, 1:] under logits[:, :-1], and the count;
    (nan, 0) when the output is not next-token logits over the ids' vocabulary."""
    if ids.is_floating_point() or logits.dim() != 3 or logits.shape[:2] != ids.shape \
            or int(ids.max()) >= logits.shape[-1]:
        return math.nan, 0
    flat = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    return float(F.cross_entropy(flat, ids[:, 1:].reshape(-1), reduction="sum")), flat.shape[0]


@dataclass
class DivergenceResult:
    kl: float     # mean over tokens of KL(reference || model), nats
    js: float     # mean over tokens of Jensen-Shannon divergence, nats (<= ln 2)
    top1_agreement: float
    tokens: int

    def to_json(self) -> dict:
        return dict(self.__dict__)


def divergence(reference: Any, model: Any, windows: list[torch.Tensor], progress: bool = True) -> DivergenceResult:
    run_ref, run = as_logits_fn(reference), as_logits_fn(model)
    kl_sum = js_sum = agree = 0.0
    tokens = 0
    for ids in tqdm(windows, desc="divergence", unit="window", disable=not progress, leave=False):
        logp = F.log_softmax(run_ref(ids)[0].double(), -1)
        logq = F.log_softmax(run(ids)[0].double(), -1)
        p, q = logp.exp(), logq.exp()
        log_m = torch.logsumexp(torch.stack([logp, logq]), 0) - math.log(2)
        kl_sum += float((p * (logp - logq)).sum())
        js_sum += float(0.5 * (p * (logp - log_m)).sum() + 0.5 * (q * (logq - log_m)).sum())
        agree += float((logp.argmax(-1) == logq.argmax(-1)).sum())
        tokens += ids.shape[1]
    return DivergenceResult(kl_sum / tokens, js_sum / tokens, agree / tokens, tokens)


def divergence_of_logits(before: list[torch.Tensor], after: list[torch.Tensor], ids: list[torch.Tensor]) -> dict:
    """Divergence of `after` from `before` (lists of logits [B, S, V], one per batch) and, when
    they are next-token logits over `ids`, the perplexity of each; for the pass log."""
    js = kl = agree = 0.0
    rows, nll_before, nll_after, tokens = 0, 0.0, 0.0, 0
    for b, a, x in zip(before, after, ids):
        logp, logq = log_probs(b), log_probs(a)
        js += js_divergence(logp, logq) * logp.shape[0]
        kl += float((logp.exp() * (logp - logq)).sum())
        agree += float((logp.argmax(-1) == logq.argmax(-1)).sum())
        rows += logp.shape[0]
        nb, count = next_token_nll(b, x)
        na, _ = next_token_nll(a, x)
        nll_before, nll_after, tokens = nll_before + nb, nll_after + na, tokens + count
    out = {"batches": len(before), "rows": rows, "js": js / rows, "kl": kl / rows, "top1_agreement": agree / rows}
    if tokens:
        out.update(perplexity_before=math.exp(nll_before / tokens), perplexity_after=math.exp(nll_after / tokens))
    return out
