"""Layer skipping on SmolLM2-135M: sublayers removed x method -> perplexity and prefill latency.

    python benchmarks/layer_skip.py [--budgets 0 3 6 10 15] [--methods tail bi finercut finercut-oneshot]
                                    [--score-windows 4] [--max-tokens 4096] [--repeats 10] [--json out.json]

Methods rank the 60 sublayers (30 attention, 30 FFN) on `--score-windows` x 128 tokens of
../shared/corpus/calibration.txt (FinerCut greedy re-scores every remaining sublayer after
each removal; the budgets are prefixes of one ranking). Each configuration is compiled with
the onnxruntime backend; its perplexity is the compiled model's on evaluation.txt in
128-token windows, and prefill latencies are timed round-robin in one run (ratio: the
unpruned model's median / this one's, so > 1 is faster).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import interleaved_medians, print_table, write_json  # noqa: E402

import graphopt  # noqa: E402
from graphopt.analysis.quality import perplexity, token_windows  # noqa: E402
from graphopt.analysis.sublayers import SkipEvaluator, find_sublayers  # noqa: E402
from graphopt.corpus import read_text  # noqa: E402
from graphopt.frontend.torch_export import capture  # noqa: E402
from graphopt.passes import ConstantFolding, DeadCodeElimination  # noqa: E402
from graphopt.passes.layer_skipping import LayerSkipping, RemovalStep, rank_removals  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budgets", type=int, nargs="+", default=[0, 3, 6, 10, 15])
    ap.add_argument("--methods", nargs="+", default=["tail", "bi", "finercut", "finercut-oneshot"])
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--score-windows", type=int, default=4, help="calibration windows the methods score on")
    ap.add_argument("--max-tokens", type=int, default=4096, help="evaluation tokens")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--orders", metavar="JSON", help="reuse rankings saved by --save-orders (skips the search)")
    ap.add_argument("--save-orders", metavar="JSON", help="write the rankings (method -> [names, js])")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    bundle = graphopt.models.load("smollm2")
    model, tokenizer = bundle.model, bundle.tokenizer
    windows = token_windows(tokenizer, read_text("evaluation.txt"), args.seq_len, args.max_tokens)
    scoring = [(w,) for w in token_windows(tokenizer, read_text("calibration.txt"), args.seq_len,
                                           args.seq_len * args.score_windows)]
    ids = windows[0]

    gm = capture(model, (ids,)).graph_module
    ConstantFolding()(gm)
    evaluator = SkipEvaluator(gm, scoring, find_sublayers(gm))
    rankings, rank_seconds = {}, {}
    saved = json.load(open(args.orders)) if args.orders else {}
    by_name = {sub.name: sub for sub in evaluator.sublayers}
    for method in args.methods:
        start = time.perf_counter()
        if method in saved:
            rankings[method] = [RemovalStep((by_name[name],), js=js) for name, js in saved[method]["steps"]]
            rank_seconds[method] = saved[method]["seconds"]
        else:
            rankings[method] = rank_removals(gm, scoring, method, max(args.budgets), evaluator=evaluator)
            rank_seconds[method] = time.perf_counter() - start
        order = ", ".join(f"{s.unit[0].label}" for s in rankings[method])
        print(f"  {method} ({rank_seconds[method]:.0f}s): {order}", file=sys.stderr)
    if args.save_orders:
        with open(args.save_orders, "w") as f:
            json.dump({m: {"seconds": rank_seconds[m], "steps": [[s.names[0], s.js] for s in steps]}
                       for m, steps in rankings.items()}, f, indent=1)

    rows, runners, compiled = [], {}, {}
    for method in args.methods:
        for budget in args.budgets:
            names = tuple(n for step in rankings[method][:budget] for n in step.names)
            if names not in compiled:
                passes = [ConstantFolding(), LayerSkipping(remove=names), DeadCodeElimination()] if names \
                    else [ConstantFolding(), DeadCodeElimination()]
                cm = graphopt.compile(model, (ids,), passes=passes, backend="onnxruntime",
                                      backend_options={"threads": args.threads}, progress=False)
                compiled[names] = (cm, perplexity(cm, windows, progress=False).perplexity)
                runners[names] = lambda cm=cm: cm(ids)
            cm, ppl = compiled[names]
            steps = rankings[method][:budget]
            kinds = [s.kind for step in steps for s in step.unit]
            rows.append({"name": f"{method} -{budget}", "method": method, "removed": budget,
                         "attention": kinds.count("attention"), "ffn": kinds.count("ffn"),
                         "score_js": steps[-1].js if steps else 0.0, "perplexity": ppl,
                         "rank_s": rank_seconds[method], "_key": names})
            print(f"  {rows[-1]['name']}: perplexity {ppl:.3f}", file=sys.stderr)

    medians = interleaved_medians(runners, args.repeats)
    base = next(r for r in rows if r["removed"] == 0) if 0 in args.budgets else None
    base_ppl = base["perplexity"] if base else float("nan")
    base_s = medians[()] if () in medians else float("nan")
    for row in rows:
        key = row.pop("_key")
        row["ppl_vs_full_pct"] = 100 * (row["perplexity"] / base_ppl - 1)
        row["prefill_ms"] = medians[key] * 1e3
        row["speedup_vs_full"] = base_s / medians[key]
    print(f"\nSmolLM2-135M, onnxruntime, {args.threads} threads; methods score on {len(scoring)} x {args.seq_len} "
          f"calibration tokens; perplexity on {len(windows)} x {args.seq_len} tokens of evaluation.txt "
          f"(unpruned {base_ppl:.3f}); prefill {args.seq_len} tokens, median of {args.repeats} interleaved rounds")
    print_table(rows, ["name", "attention", "ffn", "score_js", "perplexity", "ppl_vs_full_pct", "prefill_ms",
                       "speedup_vs_full", "rank_s"])
    for budget in args.budgets:
        if budget == 0:
            continue
        at = {r["method"]: r["perplexity"] for r in rows if r["removed"] == budget}
        best = min(at, key=at.get)
        print(f"  {budget:2d} removed: best {best} ({at[best]:.3f})")
    write_json(rows, args.json)


if __name__ == "__main__":
    main()
