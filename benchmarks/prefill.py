"""128-token SmolLM2 prefill latency: torch eager, torch.compile, ONNX Runtime on the plain
torch.onnx export, and graphopt (onnxruntime) with the "none", "default" and "fuse" presets.

    python benchmarks/prefill.py [--seq-len 128] [--repeats 10] [--threads 2] [--json out.json]

All peers run in this process, on the same tokens, with the same thread count; compare the
ratios, not the absolute times (shared machines are noisy).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import median_seconds, print_table, write_json  # noqa: E402

import graphopt  # noqa: E402
from graphopt.corpus import read_text  # noqa: E402
from graphopt.runtime import OrtRunner  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--skip-torch-compile", action="store_true")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    bundle = graphopt.models.load("smollm2")
    model = bundle.model
    (ids,) = bundle.example_inputs(seq_len=args.seq_len, text=read_text("evaluation.txt", 20000))
    with torch.no_grad():
        reference = model(input_ids=ids).logits
    rows = []

    def add(name, fn, setup_seconds=None):
        out = fn()
        out = out.logits if hasattr(out, "logits") else out
        diff = float((torch.as_tensor(out) - reference).abs().max())
        seconds = median_seconds(fn, args.repeats)
        rows.append({"name": name, "median_ms": seconds * 1e3, "setup_s": setup_seconds, "max_abs_diff": diff})
        print(f"  {name}: {seconds * 1e3:.1f} ms", file=sys.stderr)

    with torch.no_grad():
        add("torch eager", lambda: model(input_ids=ids))
        if not args.skip_torch_compile:
            compiled = torch.compile(model)
            start = time.perf_counter()
            compiled(input_ids=ids)
            add("torch.compile", lambda: compiled(input_ids=ids), time.perf_counter() - start)

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        program = torch.onnx.export(model, (ids,), dynamo=True, input_names=["input_ids"], verbose=False)
        path = os.path.join(tmp, "plain.onnx")
        program.save(path, external_data=True)
        runner = OrtRunner(path, [graphopt.TensorSpec("input_ids", tuple(ids.shape), "int64")], [], args.threads)
        add("onnxruntime (plain export)", lambda: torch.from_numpy(runner.run([ids])[0]), time.perf_counter() - start)
        del runner

    for preset in ("none", "default", "fuse"):
        start = time.perf_counter()
        cm = graphopt.compile(model, (ids,), passes=preset, backend="onnxruntime",
                              backend_options={"threads": args.threads}, progress=False)
        add(f"graphopt onnxruntime ({preset})", lambda: cm(ids), time.perf_counter() - start)
        del cm

    eager = rows[0]["median_ms"]
    plain = next(r["median_ms"] for r in rows if r["name"].startswith("onnxruntime"))
    for r in rows:
        r["speedup_vs_eager"] = eager / r["median_ms"]
        r["speedup_vs_ort_plain"] = plain / r["median_ms"]
    print(f"\nSmolLM2-135M prefill, {args.seq_len} tokens, {args.threads} threads, median of {args.repeats}")
    print_table(rows, ["name", "median_ms", "speedup_vs_eager", "speedup_vs_ort_plain", "setup_s", "max_abs_diff"])
    write_json(rows, args.json)


if __name__ == "__main__":
    main()
