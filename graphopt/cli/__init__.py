"""Command line: `graphopt compile | generate | inspect | bench | eval | superweights | sublayers | channels | models`.

    graphopt compile --model smollm2 --backend onnxruntime --out dist/smollm2
    graphopt compile --model smollm2 --task text-generation --passes int4 --out dist/smollm2-gen
    graphopt generate dist/smollm2-gen --prompt "Tell me about cats." --chat
    graphopt compile --model model.onnx --dim batch=1 --dim sequence=128 --out dist/model
    graphopt inspect dist/smollm2
    graphopt bench dist/smollm2
    graphopt eval --model smollm2 --artifact dist/smollm2
`generate`, `inspect` and `bench` need only numpy and onnxruntime (and tokenizers to generate).

One module per group of subcommands: compile.py, artifacts.py (no torch), analysis.py;
the report command lives with the report (graphopt/report/command.py).
"""
from __future__ import annotations

import argparse
import sys

from ..errors import GraphoptError


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """All subcommands; given the `command` about to run, flags that would import torch are
    added only if it is compile (or unknown)."""
    from ..report.command import add_parser as add_report_parser
    from . import analysis, artifacts, compile
    ap = argparse.ArgumentParser(prog="graphopt", description="Compile neural networks into smaller, faster artifacts.")
    sub = ap.add_subparsers(dest="command", required=True)
    compile.add_parsers(sub, with_pass_flags=command in (None, "compile"))
    artifacts.add_parsers(sub)
    analysis.add_parsers(sub)
    add_report_parser(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command).parse_args(argv)
    try:
        args.func(args)
    except GraphoptError as exc:
        print(f"graphopt: error: {exc}", file=sys.stderr)
        return 1
    return 0
