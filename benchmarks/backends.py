"""Every model family on every backend: latency, compile time and accuracy vs torch eager.

    python benchmarks/backends.py [--models resnet densenet gpt2 bert llama] [--seq-len 128]
                                  [--repeats 20] [--threads 2] [--json out.json]

Models are the random-weight configs and CNNs of graphopt.models (SmolLM2 itself is in
prefill.py). Per model, torch eager, graphopt(onnxruntime) and graphopt(tvm) run the same
inputs, timed round-robin in blocks of calls (ratios matter, not absolute times).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import interleaved_medians, print_table, write_json  # noqa: E402

import graphopt  # noqa: E402
from graphopt.frontend.torch_export import flat_tensors  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet", "densenet", "gpt2", "bert", "llama"])
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--calls-per-round", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    rows = []
    for name in args.models:
        bundle = graphopt.models.load(name)
        inputs = (bundle.example_inputs(seq_len=args.seq_len) if bundle.is_sequence_model
                  else bundle.example_inputs())
        with torch.no_grad():
            reference = flat_tensors(bundle.model(*inputs))[0]

        def eager(model=bundle.model, inputs=inputs):
            with torch.no_grad():
                return model(*inputs)
        candidates, setup, errors = {"torch eager": eager}, {"torch eager": None}, {"torch eager": 0.0}
        for backend in ("onnxruntime", "tvm"):
            started = time.perf_counter()
            cm = graphopt.compile(bundle.model, inputs, backend=backend,
                                  backend_options={"threads": args.threads}, progress=False)
            setup[backend] = time.perf_counter() - started
            out = cm(*inputs)
            out = out[0] if isinstance(out, tuple) else out
            errors[backend] = float((out - reference).abs().max() / reference.abs().max())
            candidates[backend] = lambda cm=cm, inputs=inputs: cm(*inputs)
            print(f"  ready: {name} {backend}", file=sys.stderr)
        medians = interleaved_medians(candidates, args.repeats, calls_per_round=args.calls_per_round)
        eager_ms = medians["torch eager"] * 1e3
        for backend, seconds in medians.items():
            rows.append({"name": f"{name} {backend}", "model": name, "backend": backend,
                         "median_ms": seconds * 1e3, "speedup_vs_eager": eager_ms / (seconds * 1e3),
                         "compile_s": setup[backend], "rel_error": errors[backend]})
    print(f"\nlatency per call, {args.threads} threads, median of {args.repeats} interleaved rounds "
          f"of {args.calls_per_round} calls; rel_error = max |out - eager| / max |eager|")
    print_table(rows, ["name", "median_ms", "speedup_vs_eager", "compile_s", "rel_error"])
    write_json(rows, args.json)


if __name__ == "__main__":
    main()
