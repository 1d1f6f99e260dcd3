"""Attention-head pruning on SmolLM2-135M: key/value groups dropped -> weights, perplexity,
128-token prefill latency (onnxruntime).

    python benchmarks/head_pruning.py [--ratios 0.34 0.67] [--eval-windows 16] [--repeats 10] [--json out.json]

SmolLM2 has 3 key/value heads (9 query heads) per layer: ratio 0.34 drops one group (3 query
heads) in every layer, 0.67 two. Importance: the L2 norm of each group's weights; no
fine-tuning. Perplexity on 128-token windows of evaluation.txt.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import interleaved_medians, print_table, write_json  # noqa: E402

import graphopt  # noqa: E402
from graphopt.analysis.quality import perplexity, token_windows  # noqa: E402
from graphopt.corpus import read_text  # noqa: E402
from graphopt.ir.graph import parameter_bytes  # noqa: E402
from graphopt.passes import AttentionHeadPruning, ConstantFolding, DeadCodeElimination  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.34, 0.67])
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    bundle = graphopt.models.load("smollm2")
    windows = token_windows(bundle.tokenizer, read_text("evaluation.txt"), 128, 128 * args.eval_windows)
    compiled = {}
    for ratio in [0.0, *args.ratios]:
        passes = [ConstantFolding(), AttentionHeadPruning(ratio=ratio), DeadCodeElimination()]
        compiled[ratio] = graphopt.compile(bundle.model, (windows[0],), passes=passes, backend="onnxruntime",
                                           backend_options={"threads": args.threads}, progress=False)
        print(f"  compiled ratio {ratio}", file=sys.stderr)
    times = interleaved_medians({r: (lambda cm=cm: cm(windows[0])) for r, cm in compiled.items()}, args.repeats)
    rows = []
    for ratio, cm in compiled.items():
        record = next(r for r in cm.records if r.name == "attention_head_pruning")
        rows.append({"name": f"heads ratio {ratio}", "ratio": ratio, "attentions_pruned": len(record.changes),
                     "weights_mb": parameter_bytes(cm.graph_module) / 1e6,
                     "perplexity": perplexity(cm, windows, progress=False).perplexity,
                     "ort_ms": times[ratio] * 1e3, "ort_speedup": times[0.0] / times[ratio]})
    print(f"\nSmolLM2-135M attention-head pruning; perplexity on {len(windows)} x 128 tokens of evaluation.txt; "
          f"128-token prefill, {args.threads} threads, median of {args.repeats} interleaved rounds")
    print_table(rows, ["name", "attentions_pruned", "weights_mb", "perplexity", "ort_ms", "ort_speedup"])
    write_json(rows, args.json)


if __name__ == "__main__":
    main()
