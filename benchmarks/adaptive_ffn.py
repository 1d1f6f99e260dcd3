"""Input-adaptive FFN skipping (FFN-SkipLLM) on SmolLM2-135M: skip ratio vs perplexity.

    python benchmarks/adaptive_ffn.py [--thresholds 0.99 0.98 0.97 0.96 0.95 0.9] [--span 1 2]
                                      [--region 4 26] [--warmup 25] [--max-tokens 4096] [--json out.json]

Attention always runs. Per token, an FFN of the region [start, end) whose residual cosine
cos(h, h + FFN(h)) exceeds the threshold makes the next `span` FFNs pass that token
through; the first `warmup` positions of each window run in full. Simulated on the IR with
per-token decisions in a causal prefill, which is what token-by-token decoding with the same
decisions computes. Perplexity on evaluation.txt in 128-token windows; JS against the
unmodified model. Also counts saturated FFNs on the first 4 windows.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import print_table, write_json  # noqa: E402

import graphopt  # noqa: E402
from graphopt.analysis.quality import token_windows  # noqa: E402
from graphopt.analysis.sublayers import SkipEvaluator, adaptive_ffn_skipping, ffn_saturation, find_sublayers  # noqa: E402
from graphopt.corpus import read_text  # noqa: E402
from graphopt.ir.capture import capture  # noqa: E402
from graphopt.passes import ConstantFolding  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--thresholds", type=float, nargs="+", default=[0.99, 0.98, 0.97, 0.96, 0.95, 0.9])
    ap.add_argument("--span", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--region", type=int, nargs=2, default=[4, 26])
    ap.add_argument("--warmup", type=int, default=25)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    bundle = graphopt.models.load("smollm2")
    windows = [(w,) for w in token_windows(bundle.tokenizer, read_text("evaluation.txt"), args.seq_len,
                                           args.max_tokens)]
    gm = capture(bundle.model, windows[0]).graph_module
    ConstantFolding()(gm)
    evaluator = SkipEvaluator(gm, windows, find_sublayers(gm))
    base = evaluator.score(frozenset())
    profile = ffn_saturation(SkipEvaluator(gm, windows[:4], evaluator.sublayers))   # keeps every value: 4 windows
    saturated = [s for s in profile if s.fraction_above[0.95] >= 0.5]
    print(f"{len(saturated)} of 30 FFNs leave >= 95% cosine for at least half the tokens", file=sys.stderr)
    rows = []
    for span in args.span:
        for p in adaptive_ffn_skipping(evaluator, args.thresholds, tuple(args.region), span, args.warmup):
            rows.append({"name": f"span {span} cos > {p.threshold}", "span": span, "threshold": p.threshold,
                         "ffn_skip_ratio": p.skip_ratio, "region_skip_ratio": p.region_skip_ratio,
                         "perplexity": p.perplexity, "ppl_vs_full_pct": 100 * (p.perplexity / base.perplexity - 1),
                         "js": p.js})
            print(f"  {rows[-1]['name']}: skip {p.skip_ratio:.1%}, perplexity {p.perplexity:.3f}", file=sys.stderr)
    print(f"\nSmolLM2-135M, FFN region {args.region[0]}..{args.region[1] - 1}, warmup {args.warmup} positions; "
          f"{len(windows)} x {args.seq_len} tokens of evaluation.txt (full model {base.perplexity:.3f})")
    print_table(rows, ["name", "ffn_skip_ratio", "region_skip_ratio", "perplexity", "ppl_vs_full_pct", "js"])
    write_json(rows, args.json)


if __name__ == "__main__":
    main()
