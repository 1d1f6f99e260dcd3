"""Attention-head pruning on SmolLM2-135M: key/value groups dropped -> weights, perplexity,
128-token prefill latency (onnxruntime), for each importance and scope.

    python benchmarks/head_pruning.py [--configs l2:layer:0.34 ablation:global:0.34 ...]
                                      [--eval-windows 16] [--repeats 10] [--json out.json]

A config is importance:scope:ratio. SmolLM2 has 3 key/value heads (9 query heads) in each of
30 layers: scope "layer" with ratio 0.34 drops one group (3 query heads) in every layer;
scope "global" with ratio 0.34 drops 30 of the 90 groups wherever they matter least.
Importance "l2" is the weight norm of a group; "ablation" the measured Jensen-Shannon
divergence of the logits when the group is zeroed, on 4 x 128 tokens of calibration.txt
(~75 s per config). No fine-tuning. Perplexity on 128-token windows of evaluation.txt.
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
    ap.add_argument("--configs", nargs="+", default=["l2:layer:0.34", "l2:layer:0.67", "ablation:layer:0.34",
                                                      "ablation:global:0.17", "ablation:global:0.34",
                                                      "ablation:global:0.5"])
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--calibration-windows", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    bundle = graphopt.models.load("smollm2")
    windows = token_windows(bundle.tokenizer, read_text("evaluation.txt"), 128, 128 * args.eval_windows)
    calibration = [(w,) for w in token_windows(bundle.tokenizer, read_text("calibration.txt"), 128,
                                               128 * args.calibration_windows)]
    compiled, settings = {}, {}
    for config in ["unpruned", *args.configs]:
        if config == "unpruned":
            pruning = []
        else:
            importance, scope, ratio = config.split(":")
            pruning = [AttentionHeadPruning(ratio=float(ratio), importance=importance, scope=scope, progress=False)]
        passes = [ConstantFolding(), *pruning, DeadCodeElimination()]
        compiled[config] = graphopt.compile(bundle.model, (windows[0],), passes=passes, backend="onnxruntime",
                                            calibration=calibration if pruning else None,
                                            backend_options={"threads": args.threads}, progress=False)
        settings[config] = pruning[0] if pruning else None
        print(f"  compiled {config}", file=sys.stderr)
    times = interleaved_medians({c: (lambda cm=cm: cm(windows[0])) for c, cm in compiled.items()}, args.repeats)
    rows = []
    for config, cm in compiled.items():
        pruning = settings[config]
        total = sum(len(s) for s in pruning.scores.values()) if pruning else 0
        dropped = sum(p.groups - len(p.kept_groups) for p in pruning.pruned.values()) if pruning else 0
        rows.append({"name": config, "groups_dropped": dropped, "groups": total,
                     "attentions_pruned": len(pruning.pruned) if pruning else 0,
                     "weights_mb": parameter_bytes(cm.graph_module) / 1e6,
                     "perplexity": perplexity(cm, windows, progress=False).perplexity,
                     "ort_ms": times[config] * 1e3, "ort_speedup": times["unpruned"] / times[config]})
    print(f"\nSmolLM2-135M attention-head pruning; perplexity on {len(windows)} x 128 tokens of evaluation.txt; "
          f"128-token prefill, {args.threads} threads, median of {args.repeats} interleaved rounds")
    print_table(rows, ["name", "groups_dropped", "attentions_pruned", "weights_mb", "perplexity", "ort_ms",
                       "ort_speedup"])
    write_json(rows, args.json)


if __name__ == "__main__":
    main()
