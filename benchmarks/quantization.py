"""Quantization schemes on SmolLM2-135M: artifact size, perplexity, 128-token prefill latency.

    python benchmarks/quantization.py [--max-tokens 4096] [--calib-tokens 2048] [--repeats 10] [--json out.json]

Every scheme is compiled with the onnxruntime backend and saved; the size is the saved
artifact's bytes, the perplexity is the compiled model's (what ships) on
../shared/corpus/evaluation.txt in 128-token windows, calibration (GPTQ, weighted clipping,
layer importance) reads calibration.txt, and latencies are timed round-robin in one run
(ratios vs fp32 in the same run). Embeddings and the tied LM head are int8 per channel in
every scheme (head_bits=8); W8A8 quantizes the other linear layers' activations and weights.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import interleaved_medians, print_table, write_json  # noqa: E402

import graphopt  # noqa: E402
from graphopt.analysis.quality import perplexity, token_windows  # noqa: E402
from graphopt.corpus import read_text  # noqa: E402
from graphopt.passes import (  # noqa: E402
    ActivationQuantization,
    ConstantFolding,
    DeadCodeElimination,
    MixedPrecisionQuantization,
    WeightQuantization,
)


def schemes() -> dict[str, list]:
    def pipeline(quantizer):
        return lambda: [ConstantFolding(), quantizer(), DeadCodeElimination()]
    wq = WeightQuantization
    return {
        "fp32": pipeline(lambda: None),
        "int8 weight-only (fp32 compute)": pipeline(lambda: wq(bits=8, group_size=None, accuracy_level=0)),
        "int8 weight-only (int8 compute)": pipeline(lambda: wq(bits=8, group_size=None)),
        "int4 g32 RTN": pipeline(lambda: wq(bits=4, group_size=32)),
        "int4 g64 RTN": pipeline(lambda: wq(bits=4, group_size=64)),
        "int4 g128 RTN": pipeline(lambda: wq(bits=4, group_size=128)),
        "int4 g64 clip+super-weight restore": pipeline(
            lambda: wq(bits=4, group_size=64, clip="mse", restore_super_weights=True)),
        "int4 g64 GPTQ+super-weight restore": pipeline(
            lambda: wq(bits=4, group_size=64, method="gptq", restore_super_weights=True)),
        "int4 g64 GPTQ+clip+super-weight restore": pipeline(
            lambda: wq(bits=4, group_size=64, method="gptq", clip="mse", restore_super_weights=True)),
        "W8A8 static (percentile, outlier channels fp32)": lambda: [
            ConstantFolding(), ActivationQuantization(), wq(bits=8, group_size=None), DeadCodeElimination()],
        "mixed 4/8 (LIM) at int4 g64 bytes": pipeline(
            lambda: MixedPrecisionQuantization(low=(4, 256), high=(8, None), budget_scheme=(4, 64),
                                               importance="lim", method="gptq", clip="mse",
                                               restore_super_weights=True)),
    }


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=4096, help="evaluation tokens")
    ap.add_argument("--calib-tokens", type=int, default=2048, help="calibration tokens")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--only", nargs="*", help="run only schemes whose name contains one of these")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    bundle = graphopt.models.load("smollm2")
    model, tokenizer = bundle.model, bundle.tokenizer
    windows = token_windows(tokenizer, read_text("evaluation.txt"), args.seq_len, args.max_tokens)
    calibration = [(w,) for w in token_windows(tokenizer, read_text("calibration.txt"), args.seq_len,
                                               args.calib_tokens)]
    ids = windows[0]
    eager_ppl = perplexity(model, windows, progress=False).perplexity
    print(f"eager fp32 perplexity {eager_ppl:.3f} on {len(windows)} x {args.seq_len} tokens", file=sys.stderr)

    tmp = tempfile.TemporaryDirectory()
    rows, runners = [], {}
    for name, make in schemes().items():
        if args.only and name != "fp32" and not any(s in name for s in args.only):
            continue
        start = time.perf_counter()
        passes = [p for p in make() if p is not None]
        cm = graphopt.compile(model, (ids,), passes=passes, backend="onnxruntime", calibration=calibration,
                              backend_options={"threads": args.threads}, progress=False)
        compile_s = time.perf_counter() - start
        path = cm.save(os.path.join(tmp.name, str(len(rows))))
        ppl = perplexity(cm, windows, progress=False).perplexity
        quant = [r for r in cm.records if "quantization" in r.name and r.modified]
        rows.append({"name": name, "artifact_mb": dir_bytes(path) / 1e6, "perplexity": ppl,
                     "compile_s": compile_s, "verify_max_diff": quant[0].max_output_diff if quant else 0.0})
        runners[name] = lambda cm=cm: cm(ids)
        print(f"  ready: {name}: {rows[-1]['artifact_mb']:.1f} MB, perplexity {ppl:.3f} ({compile_s:.0f}s)",
              file=sys.stderr)
        for note in (quant[0].notes[:3] if quant else []):
            print(f"    {note}", file=sys.stderr)

    medians = interleaved_medians(runners, args.repeats)
    base = rows[0]
    for row in rows:
        row["size_vs_fp32"] = row["artifact_mb"] / base["artifact_mb"]
        row["ppl_vs_fp32_pct"] = 100 * (row["perplexity"] / base["perplexity"] - 1)
        row["prefill_ms"] = medians[row["name"]] * 1e3
        row["speedup_vs_fp32"] = medians[base["name"]] / medians[row["name"]]
    print(f"\nSmolLM2-135M, onnxruntime, {args.threads} threads; perplexity on {len(windows)} x {args.seq_len} "
          f"tokens of evaluation.txt (eager fp32 {eager_ppl:.3f}); prefill {args.seq_len} tokens, "
          f"median of {args.repeats} interleaved rounds")
    print_table(rows, ["name", "artifact_mb", "size_vs_fp32", "perplexity", "ppl_vs_fp32_pct", "prefill_ms",
                       "speedup_vs_fp32", "compile_s"])
    write_json(rows, args.json)
    tmp.cleanup()


if __name__ == "__main__":
    main()
