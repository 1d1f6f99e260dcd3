"""`graphopt report MODEL_OR_ARTIFACT`: the command line of graphopt.report."""
from __future__ import annotations

import argparse
import os
import sys

from ..errors import GraphoptError
from ..runtime import default_threads


def add_parser(sub) -> None:
    r = sub.add_parser("report", help="an HTML report: time and bytes per node and module, passes, simulated changes")
    r.add_argument("target", help="a model name from `graphopt models`, an .onnx file, or an artifact directory")
    r.add_argument("-o", "--out", default="report.html", help="HTML file to write (default: report.html)")
    r.add_argument("--json", help="also write the report's data as JSON here")
    r.add_argument("--passes", default="default", help="preset to compile a model name with (default: default)")
    r.add_argument("--seq-len", type=int, default=128, help="tokens of a language model's example input")
    r.add_argument("--image-size", type=int, default=32, help="height and width of an image model's example input")
    r.add_argument("--simulate", action="append", default=[], metavar="CHANGE",
                   help="predict a change: int4:PATTERN, int8:PATTERN, drop:NAME[,NAME], prune:RATIO, heads:RATIO "
                        "(repeatable)")
    r.add_argument("--apply", action="store_true", help="also compile each simulated change and measure it")
    r.add_argument("--compare", help="a second model or artifact shown side by side per layer")
    r.add_argument("--threads", type=int, default=None)
    r.add_argument("--runs", type=int, default=10, help="profiled runs (after 3 warm-up runs)")
    r.set_defaults(func=run)


def _is_artifact(target: str) -> bool:
    return os.path.isdir(target) and os.path.exists(os.path.join(target, "manifest.json"))


def _report_of(target: str, args, with_simulations: bool):
    import torch

    import graphopt

    from .sources import failure_report, report_artifact, report_compiled
    if _is_artifact(target):
        if with_simulations and args.simulate:
            raise GraphoptError("--simulate needs the model, not an artifact: give a model name or an .onnx file")
        return report_artifact(target, args.threads, args.runs)
    if os.path.isdir(target):
        raise GraphoptError(f"{target} is a directory without manifest.json: not a graphopt artifact")
    torch.set_num_threads(args.threads or default_threads())
    if target.endswith(".onnx"):
        from ..frontend.onnx import example_inputs_for
        model, inputs = target, example_inputs_for(target, {})
    else:
        bundle = graphopt.models.load(target)
        inputs = bundle.example_inputs(size=args.image_size) if not bundle.is_sequence_model else \
            bundle.example_inputs(seq_len=args.seq_len)
        model = bundle.model
    print(f"compiling {target} (passes: {args.passes}) ...", file=sys.stderr)
    try:
        compiled = graphopt.compile(model, inputs, passes=args.passes, verify=False)
    except GraphoptError as exc:
        return failure_report(model, inputs, exc, title=target)
    print("profiling ...", file=sys.stderr)
    return report_compiled(compiled, title=target, threads=args.threads, runs=args.runs,
                           simulate=args.simulate if with_simulations else (), apply=args.apply)


def run(args: argparse.Namespace) -> None:
    from .build import compare_layers
    from .simulate import parse_change
    if args.apply and not args.simulate:
        raise GraphoptError("--apply measures simulated changes: give at least one --simulate CHANGE")
    for change in args.simulate:            # a bad spec fails before minutes of compiling
        parse_change(change)
    report = _report_of(args.target, args, with_simulations=True)
    if args.compare:
        report.data["compare"] = compare_layers(report, _report_of(args.compare, args, with_simulations=False))
    path = report.write_html(args.out)
    totals = report.data["totals"]
    if report.data["error"]:
        print(f"{args.target} did not compile ({report.data['error']['message']}); "
              f"the report shows what was captured", file=sys.stderr)
    else:
        print(f"{args.target}: {totals['latency_ms']:.3f} ms end to end, {totals['attributed_ms']:.3f} ms in "
              f"{totals['kernels']} kernels, {totals['unattributed_ms']:.3f} ms unattributed", file=sys.stderr)
    for row in report.data["simulations"]:
        measured = f", measured {row['measured_ms']:.3f} ms ({100 * row['error']:+.1f}%)" if row["measured_ms"] else ""
        print(f"  {row['change']}: predicted {row['predicted_ms']:.3f} ms, {row['predicted_bytes'] / 1e6:.2f} MB"
              f"{measured}", file=sys.stderr)
    print(f"report: {path} ({os.path.getsize(path) / 1e6:.1f} MB)")
    if args.json:
        report.write_json(args.json)
        print(f"data: {args.json}")
