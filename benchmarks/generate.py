"""Text generation on SmolLM2-135M: graphopt's generation artifacts against llama.cpp, ONNX
Runtime GenAI and Hugging Face generate, one run, same machine and thread count.

    python benchmarks/generate.py [--threads 2] [--repeats 3] [--rounds 1] [--rows NAME ...]
        [--json out.json] [--llama-bench PATH] [--genai-model DIR] [--artifacts dist/generate]

Every row runs in its own child process (its peak RSS is that process's, from wait4) on the
same prompts: token windows of ../shared/corpus/evaluation.txt. prompt_tps_N is N prompt
tokens over the time to process them; decode_tps_C is 32 greedy tokens after a C-token prompt
over their time; ttft_ms is the time to the first new token after a 128-token prompt;
perplexity is on evaluation.txt in 256-token windows (the artifact's own logits; null where
the peer exposes none). Missing artifacts are compiled first with `graphopt compile --task
text-generation`. With --rounds N every row runs N times, rounds alternating the row order,
and each cell is the median of its rounds (a VM's speed can drift over minutes). llama.cpp
runs the GGUF the model ships as (llama-bench; build it with `make llama-bench`), ONNX Runtime
GenAI its model builder's int4 export of the same weights (`make genai-model`); a peer that
is not there prints "not installed".
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import print_table, write_json  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
COLUMNS = ["name", "prompt_tps_128", "prompt_tps_512", "decode_tps_128", "decode_tps_1024", "ttft_ms",
           "peak_rss_mb", "bytes", "perplexity"]
# The lossy rows: int4 plus the removal of 2 of 60 sublayers by FinerCut, and int4 with a
# float16 KV cache (perplexity printed). Rows without a backend are onnxruntime's.
ARTIFACTS = {
    "graphopt fp32": ["--passes", "default"],
    "graphopt int4": ["--passes", "int4"],
    "graphopt int4 + skip 2 sublayers": ["--passes", "int4", "--skip-sublayers", "2"],
    "graphopt int4, float16 cache": ["--passes", "int4", "--cache-dtype", "float16"],
    "graphopt int4 tvm": ["--passes", "int4", "--backend", "tvm"],
    "graphopt int4 tvm + skip 2 sublayers": ["--passes", "int4", "--skip-sublayers", "2", "--backend", "tvm"],
    # int8 compute in graphopt's kernels (AMX, AVX512-VNNI or AVX2), and as an AVX2-only CPU runs it
    "graphopt int8-compute tvm": ["--passes", "default", "--backend", "tvm", "--precision", "int8"],
    "graphopt fp32 tvm, x86-64-v3": ["--passes", "default", "--backend", "tvm", "--tvm-target", "x86-64-v3"],
    "graphopt int8-compute tvm, x86-64-v3": ["--passes", "default", "--backend", "tvm", "--precision", "int8",
                                             "--tvm-target", "x86-64-v3"],
}
NEW_TOKENS = 32


def evaluation_ids(count: int, tokenizer=None) -> list[int]:
    """The first `count` tokens of evaluation.txt, by a tokenizers.Tokenizer (no torch imported)
    or, without one, by the model's own Hugging Face tokenizer."""
    from graphopt.corpus import read_text
    text = read_text("evaluation.txt")
    if tokenizer is not None:
        return tokenizer.encode(text).ids[:count]
    from transformers import AutoTokenizer

    from graphopt.models.hf import SMOLLM2_GGUF, smollm2_dir
    return AutoTokenizer.from_pretrained(smollm2_dir(), gguf_file=SMOLLM2_GGUF)(text)["input_ids"][:count]


def _median(values):
    return statistics.median(values) if values else None


# ----- children: one row each, printed as JSON on the last line of stdout
def measure_artifact(path: str, threads: int, repeats: int, ppl_tokens: int) -> dict:
    import graphopt
    lm = graphopt.load(path, threads=threads)
    lm.generate("warm up", max_new_tokens=2)
    gen = lm._generator
    ids = evaluation_ids(4096, gen.tokenizer)
    row = {}
    for n in (128, 512):
        times = []
        for r in range(repeats):
            for _ in gen.generate_tokens([ids[r:r + n]], 1):
                pass
            times.append(gen.stats.prompt_seconds)
        row[f"prompt_tps_{n}"] = n / _median(times)
    for ctx in (128, 1024):
        rates, firsts = [], []
        for r in range(repeats):
            for _ in gen.generate_tokens([ids[r:r + ctx]], NEW_TOKENS + 1):
                pass
            rates.append(gen.stats.decode_tokens_per_second)
            firsts.append(gen.stats.first_token_seconds)
        row[f"decode_tps_{ctx}"] = _median(rates)
        if ctx == 128:
            row["ttft_ms"] = _median(firsts) * 1e3
    row["bytes"] = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
    return row


def measure_artifact_perplexity(path: str, threads: int, ppl_tokens: int) -> dict:
    """In a child of its own, so that the 256 x 49152 logits it scores stay out of the peak RSS
    of generating."""
    import numpy as np

    import graphopt
    lm = graphopt.load(path, threads=threads)
    lm.generate("warm up", max_new_tokens=1)
    ids = evaluation_ids(ppl_tokens, lm._generator.tokenizer)
    windows = [np.array(ids[i:i + 256]) for i in range(0, len(ids) - 255, 256)]
    return {"perplexity": lm._generator.perplexity(windows)}


def measure_torch(threads: int, repeats: int, ppl_tokens: int) -> dict:
    import torch

    import graphopt
    from graphopt.analysis.quality import perplexity
    torch.set_num_threads(threads)
    model = graphopt.models.load("smollm2").model
    model.config.use_cache = True
    ids = evaluation_ids(4096)
    row = {}
    with torch.no_grad():
        for n in (128, 512):
            times = []
            for r in range(repeats):
                start = time.perf_counter()
                model(input_ids=torch.tensor([ids[r:r + n]]), use_cache=True)
                times.append(time.perf_counter() - start)
            row[f"prompt_tps_{n}"] = n / _median(times)
        for ctx in (128, 1024):
            rates, firsts = [], []
            for r in range(repeats):
                start = time.perf_counter()
                out = model(input_ids=torch.tensor([ids[r:r + ctx]]), use_cache=True)
                token = out.logits[:, -1:].argmax(-1)
                firsts.append(time.perf_counter() - start)
                cache = out.past_key_values
                start = time.perf_counter()
                for _ in range(NEW_TOKENS):
                    out = model(input_ids=token, past_key_values=cache, use_cache=True)
                    cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
                rates.append(NEW_TOKENS / (time.perf_counter() - start))
            row[f"decode_tps_{ctx}"] = _median(rates)
            if ctx == 128:
                row["ttft_ms"] = _median(firsts) * 1e3
        windows = [torch.tensor([ids[i:i + 256]]) for i in range(0, min(ppl_tokens, len(ids)) - 255, 256)]
        model.config.use_cache = False
        row["perplexity"] = perplexity(model, windows, progress=False).perplexity
    row["bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
    return row


def measure_genai(model_dir: str, threads: int, repeats: int) -> dict:
    import onnxruntime_genai as og
    config = og.Config(model_dir)
    config.clear_providers()
    model = og.Model(config)
    from tokenizers import Tokenizer
    ids = evaluation_ids(4096, Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json")))
    row = {}

    def run(prompt, new_tokens):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(prompt) + new_tokens, do_sample=False)
        generator = og.Generator(model, params)
        start = time.perf_counter()
        generator.append_tokens(prompt)          # runs the prompt
        generator.generate_next_token()          # picks the first new token
        first = time.perf_counter() - start
        start = time.perf_counter()
        steps = 0
        while not generator.is_done() and steps < new_tokens - 1:
            generator.generate_next_token()      # one decode step each
            steps += 1
        return first, steps / (time.perf_counter() - start) if steps else None

    run(ids[:16], 2)
    for n in (128, 512):
        row[f"prompt_tps_{n}"] = n / _median([run(ids[r:r + n], 1)[0] for r in range(repeats)])
    for ctx in (128, 1024):
        results = [run(ids[r:r + ctx], NEW_TOKENS) for r in range(repeats)]
        row[f"decode_tps_{ctx}"] = _median([rate for _, rate in results if rate])
        if ctx == 128:
            row["ttft_ms"] = _median([first for first, _ in results]) * 1e3
    row["bytes"] = sum(os.path.getsize(os.path.join(model_dir, f)) for f in os.listdir(model_dir))
    return row


def child_main(args) -> None:
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    kind, _, target = args.child.partition(":")
    if kind == "artifact":
        row = measure_artifact(target, args.threads, args.repeats, args.ppl_tokens)
    elif kind == "perplexity":
        row = measure_artifact_perplexity(target, args.threads, args.ppl_tokens)
    elif kind == "torch":
        row = measure_torch(args.threads, args.repeats, args.ppl_tokens)
    else:
        row = measure_genai(target, args.threads, args.repeats)
    print(json.dumps(row))


# ----- parent
def run_child(spec: str, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", spec, "--threads", str(args.threads),
           "--repeats", str(args.repeats), "--ppl-tokens", str(args.ppl_tokens)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    _, status, usage = os.wait4(proc.pid, 0)
    out, err = proc.stdout.read(), proc.stderr.read()
    if status != 0:
        raise RuntimeError(f"{spec} failed: {err.strip().splitlines()[-1] if err.strip() else status}")
    row = json.loads(out.strip().splitlines()[-1])
    row["peak_rss_mb"] = usage.ru_maxrss / 1024
    return row


def llama_cpp_row(binary: str, gguf: str, threads: int, repeats: int) -> dict:
    """llama-bench: prompt processing at depth 0, then 32 generated tokens after 128 and 1024
    tokens of context (its -d). Where its default weight repacking dies on this CPU (its AMX
    kernels raise SIGILL on some VMs that list AMX), the row is measured with --repack 0 and
    says so in its note."""
    row, peak, settings = {}, 0.0, []
    for extra in (["-p", "128,512", "-n", "0"], ["-p", "0", "-n", str(NEW_TOKENS), "-d", "128,1024"]):
        cmd = [binary, "-m", gguf, "-t", str(threads), "-r", str(repeats), "-o", "json", *extra, *settings]
        status, usage, out = _run_llama_bench(cmd)
        if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGILL and not settings:
            settings = ["--repack", "0"]
            row["note"] = "llama-bench's repacked (AMX) kernels died with SIGILL here: measured with --repack 0"
            status, usage, out = _run_llama_bench(cmd + settings)
        if status != 0:
            raise RuntimeError(f"llama-bench failed with status {status}: {' '.join(cmd + settings)}")
        peak = max(peak, usage.ru_maxrss / 1024)
        for test in json.loads(out):
            prompt, gen, depth, tps = test["n_prompt"], test["n_gen"], test.get("n_depth", 0), test["avg_ts"]
            row[f"prompt_tps_{prompt}" if gen == 0 else f"decode_tps_{depth}"] = tps
    row["ttft_ms"] = 128 / row["prompt_tps_128"] * 1e3 if row.get("prompt_tps_128") else None
    row["peak_rss_mb"] = peak
    row["bytes"] = os.path.getsize(gguf)
    return row


def _run_llama_bench(cmd: list[str]):
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    _, status, usage = os.wait4(proc.pid, 0)          # its JSON (a few kB) fits the pipe
    return status, usage, proc.stdout.read()


def prepare_genai(directory: str) -> None:
    """ONNX Runtime GenAI's int4 model of the same weights: its model builder reads a Hugging
    Face folder, and a model loaded from GGUF saves only after a rebuild from its config
    without the quantization config."""
    import copy

    from transformers import AutoModelForCausalLM

    import graphopt
    bundle = graphopt.models.load("smollm2")
    config = copy.deepcopy(bundle.model.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.use_cache = True
    fresh = AutoModelForCausalLM.from_config(config)
    fresh.load_state_dict(bundle.model.state_dict())
    hf_dir = directory + "-hf"
    fresh.save_pretrained(hf_dir)
    bundle.tokenizer.save_pretrained(hf_dir)
    subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", hf_dir, "-o", directory,
                    "-p", "int4", "-e", "cpu", "-c", directory + "-cache"], check=True)


def ensure_artifact(name: str, directory: str, threads: int) -> str:
    path = os.path.join(directory, re.sub(r"[^a-z0-9]+", "-", name.removeprefix("graphopt ")).strip("-"))
    if not os.path.exists(os.path.join(path, "manifest.json")):
        print(f"compiling {name} -> {path}", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "graphopt.cli", "compile", "--model", "smollm2", "--task",
                        "text-generation", "--threads", str(threads), "--out", path, *ARTIFACTS[name]],
                       check=True, cwd=REPO)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ppl-tokens", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=1, help="run every row this many times, interleaved; "
                    "each cell is the median of its rounds")
    ap.add_argument("--artifacts", default=os.path.join(REPO, "dist", "generate"))
    ap.add_argument("--llama-bench", default=os.environ.get("LLAMA_BENCH", os.path.join(REPO, "dist", "peers",
                                                                                        "llama-bench")))
    ap.add_argument("--genai-model", default=os.environ.get("GENAI_MODEL", os.path.join(REPO, "dist", "peers",
                                                                                        "genai-int4")))
    ap.add_argument("--rows", nargs="*", help="only these rows (names as printed)")
    ap.add_argument("--prepare-genai", action="store_true",
                    help="build ONNX Runtime GenAI's int4 model of SmolLM2 into --genai-model, then exit")
    ap.add_argument("--json")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child_main(args)
        return 0
    if args.prepare_genai:
        prepare_genai(args.genai_model)
        return 0
    from graphopt.models.hf import SMOLLM2_GGUF, smollm2_dir
    gguf = os.path.join(smollm2_dir(), SMOLLM2_GGUF)
    wanted = (lambda name: not args.rows or name in args.rows)
    measures = []            # (name, measure) of every row to run, in table order
    for name in ARTIFACTS:
        if wanted(name) and "tvm" in ARTIFACTS[name] and "int4" in ARTIFACTS[name] and not _tvm_int4_supported():
            measures.append((name, lambda: {"note": "not supported on this CPU (TVM int4 needs AVX512-BF16 or AMX)"}))
        elif wanted(name):
            path = ensure_artifact(name, args.artifacts, args.threads)
            measures.append((name, lambda path=path: run_child("artifact:" + path, args)))
    peers = [("llama.cpp (llama-bench, Q4_1 GGUF)", lambda: llama_cpp_row(args.llama_bench, gguf, args.threads,
                                                                          args.repeats),
              os.access(args.llama_bench, os.X_OK)),
             ("onnxruntime-genai (int4 model builder)", lambda: run_child("genai:" + args.genai_model, args),
              _importable("onnxruntime_genai") and os.path.exists(os.path.join(args.genai_model, "genai_config.json"))),
             ("torch eager (Hugging Face, fp32)", lambda: run_child("torch:", args), True)]
    for name, measure, installed in peers:
        if wanted(name):
            measures.append((name, measure if installed else (lambda: {"note": "not installed"})))
    # Each round runs every row, in reverse order every other round, so a drift of the
    # machine's speed during the run falls on every row alike; a cell is the median of its rounds.
    results: dict[str, list[dict]] = {name: [] for name, _ in measures}
    for round_index in range(args.rounds):
        for name, measure in (measures if round_index % 2 == 0 else measures[::-1]):
            print(f"round {round_index + 1}/{args.rounds}: {name}", file=sys.stderr)
            results[name].append(measure())
    rows = [{"name": name, **median_row(results[name])} for name, _ in measures]
    for row in rows:
        if row["name"] in ARTIFACTS and not row.get("note"):
            path = ensure_artifact(row["name"], args.artifacts, args.threads)
            row["perplexity"] = run_child("perplexity:" + path, args)["perplexity"]
    for row in rows:
        for column in COLUMNS:
            row.setdefault(column, None)
    fp32 = next((r for r in rows if r["name"] == "graphopt fp32"), None)
    if fp32 and fp32["perplexity"]:
        for row in rows:
            row["perplexity_change_pct"] = (100 * (row["perplexity"] / fp32["perplexity"] - 1)
                                            if row["perplexity"] else None)
    best = [r for r in rows if r["name"].startswith(("llama.cpp", "onnxruntime-genai")) and r.get("decode_tps_128")]
    for row in rows:
        for ctx in (128, 1024):
            peer = max((r[f"decode_tps_{ctx}"] or 0 for r in best), default=0)
            row[f"decode_vs_best_peer_{ctx}"] = row[f"decode_tps_{ctx}"] / peer if peer and row[f"decode_tps_{ctx}"] \
                else None
    print(f"SmolLM2-135M-Instruct, {args.threads} threads, {NEW_TOKENS} new tokens per decode measurement; "
          "a peer that is not installed shows 'not installed'")
    shown = COLUMNS + ["perplexity_change_pct", "decode_vs_best_peer_128", "decode_vs_best_peer_1024", "note"]
    print_table(rows, shown)
    write_json(rows, args.json)
    return 0


def median_row(measured: list[dict]) -> dict:
    """One row from the rounds' rows: the median of each number, the first of anything else."""
    row = dict(measured[0])
    for key, value in row.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            row[key] = _median([m[key] for m in measured if m.get(key) is not None])
    return row


def _tvm_int4_supported() -> bool:
    """Whether this CPU has the bf16 kernel TVM's int4 weights run in (and tvm is installed)."""
    if not _importable("tvm"):
        return False
    from graphopt.backends.tvm.dense_kernels import kernel_for
    from graphopt.backends.tvm.runner import cpu_flags
    return kernel_for("bf16", cpu_flags()) is not None


def _importable(name: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(name) is not None


if __name__ == "__main__":
    sys.exit(main())
