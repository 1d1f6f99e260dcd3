"""Helpers the `graphopt` subcommands share: timing, input and calibration making, backend options."""
from __future__ import annotations

import argparse
import dataclasses
import sys

from ..errors import GraphoptError


def median_ms(fn, repeats: int) -> float:
    from ..timing import median_seconds
    return median_seconds(fn, repeats, warmup=1) * 1e3


def dim_size(text: str) -> tuple[str, int]:
    name, _, size = text.partition("=")
    if not name or not size.isdigit():
        raise argparse.ArgumentTypeError(f"expected NAME=SIZE, got {text!r}")
    return name, int(size)


def precision_override(text: str) -> tuple[str, str]:
    pattern, _, precision = text.rpartition("=")
    if not pattern or not precision:
        raise argparse.ArgumentTypeError(f"expected PATTERN=PRECISION, got {text!r}")
    return pattern, precision


def backend_options(args) -> dict | None:
    precision = getattr(args, "precision", None)
    overrides = getattr(args, "precision_override", None)
    if precision is not None and args.backend not in ("tvm", "openvino"):
        raise GraphoptError("--precision is for --backend tvm or openvino")
    if overrides and args.backend != "tvm":
        raise GraphoptError("--precision-override is for --backend tvm")
    if args.tvm_target != "host" and args.backend != "tvm":
        raise GraphoptError("--tvm-target is for --backend tvm")
    if args.backend not in ("onnxruntime", "tvm", "openvino"):
        return None
    options = {"threads": args.threads}
    if args.backend == "tvm":
        options["target"] = args.tvm_target
    if precision is not None:
        options["precision"] = precision
    if overrides:
        options["precision_overrides"] = dict(overrides)
    return options


def reduced_precision(options: dict | None) -> bool:
    """Whether backend options ask for arithmetic below fp32 (TVM's int8 learns its activations'
    smoothing from the calibration batches, so they are made for it)."""
    options = options or {}
    return options.get("precision", "f32") != "f32" or \
        any(p != "f32" for p in options.get("precision_overrides", {}).values())


def example_inputs(bundle, seq_len: int):
    if not bundle.is_sequence_model:
        return bundle.example_inputs()
    if bundle.tokenizer is None:
        return bundle.example_inputs(seq_len=seq_len)
    try:
        from ..corpus import read_text
        return bundle.example_inputs(seq_len=seq_len, text=read_text("evaluation.txt", 20000))
    except GraphoptError:
        return bundle.example_inputs(seq_len=seq_len)


def calibration_batches(bundle, args):
    """Windows of calibration.txt (or --calibration-text) for passes that learn from data;
    random token ids for test models without a tokenizer."""
    if args.calibration_tokens <= 0 or not bundle.is_sequence_model:
        return None
    if bundle.tokenizer is None:
        print(f"{bundle.name} has no tokenizer: calibrating on random token ids", file=sys.stderr)
        return [bundle.example_inputs(seq_len=args.seq_len, seed=s)
                for s in range(1, 1 + max(1, args.calibration_tokens // args.seq_len))]
    from ..analysis.quality import token_windows
    from ..corpus import read_text
    if args.calibration_text:
        with open(args.calibration_text, encoding="utf-8") as f:
            text = f.read()
    else:
        try:
            text = read_text("calibration.txt")
        except GraphoptError:
            return None
    return [(w,) for w in token_windows(bundle.tokenizer, text, args.seq_len, args.calibration_tokens)]


def folded_graph(bundle, inputs):
    """The model's IR after constant folding: what the analysis commands look at."""
    from ..frontend.torch_export import capture
    from ..passes import ConstantFolding
    gm = capture(bundle.model, inputs).graph_module
    ConstantFolding()(gm)
    return gm



def option_flag(parser: argparse.ArgumentParser, flag: str, options: type, name: str, **overrides) -> None:
    """A flag made from a pass option field (passes/base.py `option`): its default, accepted
    choices, type and help; `overrides` replace any of them."""
    f = next(f for f in dataclasses.fields(options) if f.name == name)
    kwargs = {"default": f.default, "help": f.metadata["help"]}
    if f.metadata["choices"] is not None:
        kwargs["choices"] = list(f.metadata["choices"])
    if type(f.default) in (int, float):
        kwargs["type"] = type(f.default)
    kwargs.update(overrides)
    parser.add_argument(flag, **kwargs)


def add_executor_flags(parser) -> None:
    parser.add_argument("--ray", metavar="ADDRESS", default=None,
                        help="run the searches' candidate evaluations on Ray: 'auto' (the running cluster, or one "
                             "started here) or a cluster address")
    parser.add_argument("--workers", type=int, default=None, help="Ray actors (default: one per CPU)")


def executor(args):
    """The executor --ray / --workers ask for (graphopt.executors.get_executor)."""
    from ..errors import GraphoptError
    from ..executors import get_executor
    if args.ray is None and args.workers is not None:
        raise GraphoptError("--workers needs --ray")
    return get_executor(None if args.ray is None else ("ray" if args.ray == "auto" else args.ray), args.workers)
