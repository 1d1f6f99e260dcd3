"""Input-adaptive FFN skipping (FFN-SkipLLM) on SmolLM2-135M: skip ratio vs perplexity.

    python benchmarks/adaptive_ffn.py [--thresholds 0.99 0.98 0.97 0.96 0.95 0.9] [--span 1 2]
                                      [--region 4 26] [--warmup 25] [--max-tokens 4096] [--json out.json]

Attention always runs. Per token, an FFN of the region [start, end) whose residual cosine
cos(h, h + FFN(h)) exceeds the threshold makes the next `span` FFNs pass that token
through; the first `warmup` positions of each window run in full. Simulated on the IR with
per-token decisions in a causal prefill, which is what token-by-token decoding with the same
decisions computes. Perplexity on evaluation.txt in 128-token windows; JS against the
unmodified model. Also counts saturated FFNs on the first 4 windows. Decode-step latency:
the KV-cache decode step (graphopt.frontend.decode; one token after seq-len - 1 cached ones) lowered
with ONNX `If` around each skippable FFN, timed never and always skipping against the plain
step (round-robin); a row's estimate interpolates between them at its skip ratio.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import interleaved_medians, print_table, write_json  # noqa: E402

import graphopt  # noqa: E402
from graphopt.analysis.quality import token_windows  # noqa: E402
from graphopt.analysis.sublayers import SkipEvaluator, adaptive_ffn_skipping, ffn_saturation, find_sublayers  # noqa: E402
from graphopt.corpus import read_text  # noqa: E402
from graphopt.frontend.decode import DecodeStep, past_dims, prefill_cache  # noqa: E402
from graphopt.frontend.torch_export import capture  # noqa: E402
from graphopt.passes import ConstantFolding, DeadCodeElimination  # noqa: E402
from graphopt.passes.adaptive_ffn_skipping import AdaptiveFFNSkipping  # noqa: E402


def decode_step_latency(model, prompt, region, spans, repeats, threads):
    """Median seconds of a KV-cache decode step (the last prompt token, the rest cached):
    plain, and with the If graph never / always skipping; and the share of the region's FFNs
    the If graph can skip, per span."""
    inputs = (prompt[:, -1:], *prefill_cache(model, prompt[:, :-1]))
    runners, share = {}, {}

    def build(name, passes):
        cm = graphopt.compile(DecodeStep(model), inputs, passes=passes, backend="onnxruntime",
                              dynamic_dims=past_dims(model), backend_options={"threads": threads}, progress=False)
        runners[name] = lambda: cm(*inputs)
        return cm
    build("plain", [ConstantFolding(), DeadCodeElimination()])
    for span in spans:
        for label, threshold in (("never", 2.0), ("always", -2.0)):
            cm = build(f"{label} {span}", [ConstantFolding(), AdaptiveFFNSkipping(threshold=threshold, region=region,
                                                                                 span=span), DeadCodeElimination()])
        record = next(r for r in cm.records if r.name == "adaptive_ffn_skipping")
        share[span] = len(record.changes) / (region[1] - region[0])
    return interleaved_medians(runners, repeats), share


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--thresholds", type=float, nargs="+", default=[0.99, 0.98, 0.97, 0.96, 0.95, 0.9])
    ap.add_argument("--span", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--region", type=int, nargs=2, default=[4, 26])
    ap.add_argument("--warmup", type=int, default=25)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--repeats", type=int, default=30, help="decode-step timing rounds")
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
    medians, share = decode_step_latency(bundle.model, windows[0][0], tuple(args.region), args.span, args.repeats,
                                         args.threads)
    print(
        f"decode step (1 token after {args.seq_len - 1} cached, onnxruntime): plain {medians['plain'] * 1e3:.2f} ms; "
        + "; ".join(
            f"span {k}: If graph never skipping {medians[f'never {k}'] * 1e3:.2f} ms, always skipping "
            f"{medians[f'always {k}'] * 1e3:.2f} ms ({share[k]:.0%} of the region's FFNs)"
            for k in args.span
        ),
        file=sys.stderr,
    )
    for row in rows:
        k = row["span"]
        never, always = medians[f"never {k}"], medians[f"always {k}"]
        expected = never + (always - never) * min(row["region_skip_ratio"] / share[k], 1.0)
        row["decode_speedup_est"] = medians["plain"] / expected
    print(f"\nSmolLM2-135M, FFN region {args.region[0]}..{args.region[1] - 1}, warmup {args.warmup} positions; "
          f"{len(windows)} x {args.seq_len} tokens of evaluation.txt (full model {base.perplexity:.3f})")
    print_table(rows, ["name", "ffn_skip_ratio", "region_skip_ratio", "perplexity", "ppl_vs_full_pct", "js",
                       "decode_speedup_est"])
    print("decode_speedup_est: plain KV-cache decode-step latency / the If graph's, interpolated between its "
          "never- and always-skipping medians at the row's skip ratio")
    write_json(rows, args.json)


if __name__ == "__main__":
    main()
