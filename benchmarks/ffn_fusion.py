"""Sequential FFN fusion on SmolLM2-135M after attention removal: perplexity and latency
before/after fusion, the runs the dependency metric chose, and the FFN saturation profile.

    python benchmarks/ffn_fusion.py [--attention 10] [--max-dependency 0.5] [--max-ppl-increase 0.02]
                                    [--score-windows 4] [--max-tokens 4096] [--repeats 10] [--json out.json]

Attention sublayers are removed first (FinerCut one-shot over attention candidates by
default) on calibration.txt; FFNFusion then picks runs of the now consecutive FFNs by the dependency
metric under its budgets (same calibration windows). "fuse whole runs" fuses every maximal run
regardless, to show what the metric protects against. Every configuration is compiled with
the onnxruntime backend; perplexity is the compiled model's on evaluation.txt (128-token
windows); prefill latencies are timed round-robin in one run.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import interleaved_medians, print_table, write_json  # noqa: E402

import graphopt  # noqa: E402
from graphopt.analysis.quality import perplexity, token_windows  # noqa: E402
from graphopt.analysis.sublayers import SkipEvaluator, ffn_saturation, find_sublayers  # noqa: E402
from graphopt.corpus import read_text  # noqa: E402
from graphopt.frontend.torch_export import capture  # noqa: E402
from graphopt.passes import ConstantFolding, DeadCodeElimination  # noqa: E402
from graphopt.passes.ffn_fusion import FFNFusion  # noqa: E402
from graphopt.passes.layer_skipping import LayerSkipping, rank_removals  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--attention", type=int, default=10, help="attention sublayers to remove first")
    ap.add_argument("--attention-method", default="finercut-oneshot", help="how to choose them")
    ap.add_argument("--max-dependency", type=float, default=0.5)
    ap.add_argument("--max-ppl-increase", type=float, default=0.02)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--score-windows", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=4096, help="evaluation tokens")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
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

    print("FFN saturation (unmodified model, calibration tokens): cos(h, h + FFN(h)) per token", file=sys.stderr)
    saturation = ffn_saturation(evaluator)
    for s in saturation:
        shares = ", ".join(f">= {t}: {f:.1%}" for t, f in s.fraction_above.items())
        print(f"  {s.name:28s} mean {s.mean_cosine:.3f}  {shares}", file=sys.stderr)

    steps = rank_removals(gm, scoring, args.attention_method, args.attention, kinds=("attention",),
                          evaluator=evaluator)
    removed = tuple(n for step in steps for n in step.names)
    print(f"attention removed: {', '.join(removed)}", file=sys.stderr)

    def skip():
        return LayerSkipping(remove=removed)
    chooser = FFNFusion(max_dependency=args.max_dependency, max_perplexity_increase=args.max_ppl_increase,
                        batches=args.score_windows)
    configs = {
        "unpruned": [ConstantFolding(), DeadCodeElimination()],
        f"-{args.attention} attention": [ConstantFolding(), skip(), DeadCodeElimination()],
        f"-{args.attention} attention + FFN fusion (chosen runs)": [ConstantFolding(), skip(), chooser,
                                                                    DeadCodeElimination()],
        f"-{args.attention} attention + FFN fusion (whole runs)": [
            ConstantFolding(), skip(), FFNFusion(max_dependency=math.inf, max_perplexity_increase=math.inf),
            DeadCodeElimination()],
    }
    rows, runners = [], {}
    for name, passes in configs.items():
        cm = graphopt.compile(model, (ids,), passes=passes, backend="onnxruntime", calibration=scoring,
                              backend_options={"threads": args.threads}, progress=False)
        ppl = perplexity(cm, windows, progress=False).perplexity
        fusion = next((r for r in cm.records if r.name == "ffn_fusion"), None)
        groups = "; ".join(fusion.changes) if fusion and fusion.modified else ""
        rows.append({"name": name, "perplexity": ppl, "ffn_groups": groups,
                     "nodes": cm.stats["nodes_optimized"]})
        runners[name] = lambda cm=cm: cm(ids)
        print(f"  {name}: perplexity {ppl:.3f} {groups}", file=sys.stderr)
        for note in (fusion.notes if fusion else []):
            print(f"    {note}", file=sys.stderr)
    for key, matrix in chooser.dependencies.items():
        print(f"dependency matrix of the run starting at {key}:\n{matrix.numpy().round(3)}", file=sys.stderr)

    medians = interleaved_medians(runners, args.repeats)
    unpruned, skipped = rows[0], rows[1]
    for row in rows:
        row["ppl_vs_unpruned_pct"] = 100 * (row["perplexity"] / unpruned["perplexity"] - 1)
        row["prefill_ms"] = medians[row["name"]] * 1e3
        row["speedup_vs_unpruned"] = medians[unpruned["name"]] / medians[row["name"]]
        row["speedup_vs_attention_removed"] = medians[skipped["name"]] / medians[row["name"]]
    print(f"\nSmolLM2-135M, onnxruntime, {args.threads} threads; perplexity on {len(windows)} x {args.seq_len} "
          f"tokens of evaluation.txt; prefill {args.seq_len} tokens, median of {args.repeats} interleaved rounds")
    print_table(rows, ["name", "perplexity", "ppl_vs_unpruned_pct", "prefill_ms", "speedup_vs_unpruned",
                       "speedup_vs_attention_removed", "nodes"])
    for row in rows[2:]:
        print(f"  {row['name']}: {row['ffn_groups']}")
    for s in saturation:
        rows.append({"name": f"saturation {s.name}", "mean_cosine": s.mean_cosine,
                     **{f"fraction_cos_ge_{t}": f for t, f in s.fraction_above.items()}})
    write_json(rows, args.json)


if __name__ == "__main__":
    main()
