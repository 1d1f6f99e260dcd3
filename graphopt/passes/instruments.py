"""Instruments observe a PassManager run: verification, dumps, print-on-change.

An instrument never changes the graph. Hooks: `start(gm, ctx)` once, then
`before_pass(pass_, gm, ctx, record)` and `after_pass(pass_, gm, ctx, result, record)`.
"""
from __future__ import annotations

import os
import sys
from typing import TextIO

import torch
import torch.fx as fx

from ..errors import VerificationError
from ..ir.graph import describe
from ..ir.lazy import LazyInterpreter, run
from .base import EXACT


class Instrument:
    def start(self, gm: fx.GraphModule, ctx) -> None:
        pass

    def before_pass(self, pass_, gm: fx.GraphModule, ctx, record) -> None:
        pass

    def after_pass(self, pass_, gm: fx.GraphModule, ctx, result, record) -> None:
        pass


class _ShapeCheck(LazyInterpreter):
    """Runs the graph on real inputs and checks every node against its recorded meta['val']."""

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        val = n.meta.get("val")
        if isinstance(out, torch.Tensor):
            if isinstance(val, torch.Tensor):
                static = all(isinstance(d, int) for d in val.shape)
                if (static and tuple(val.shape) != tuple(out.shape)) or val.dtype != out.dtype:
                    raise VerificationError(
                        f"{describe(n)}: recorded {val.dtype}{list(val.shape)} but computes "
                        f"{out.dtype}{list(out.shape)}")
            elif n.op == "call_function":
                raise VerificationError(f"{describe(n)}: no shape metadata (meta['val']); "
                                        "passes must set it on nodes they create (graphopt.ir.graph.infer_meta)")
        return out


def run_checked(gm: fx.GraphModule, inputs) -> tuple[torch.Tensor, ...]:
    """Lint the graph, re-propagate and check shapes, and return its outputs."""
    gm.graph.lint()
    with torch.no_grad():
        return tuple(_ShapeCheck(gm).run(*inputs))


class VerifyInstrument(Instrument):
    """After each pass: the graph lints, shapes re-propagate, and the outputs stay within
    the pass's declared tolerance of the outputs before it."""

    def __init__(self, example_inputs=None):
        self.example_inputs = example_inputs
        self.reference: tuple[torch.Tensor, ...] | None = None

    def start(self, gm, ctx):
        inputs = self.example_inputs if self.example_inputs is not None else ctx.example_inputs
        if inputs is None:
            raise VerificationError("VerifyInstrument needs example inputs")
        self.example_inputs = tuple(inputs)
        self.reference = run_checked(gm, self.example_inputs)

    def after_pass(self, pass_, gm, ctx, result, record):
        if not result.modified:
            return
        outputs = run_checked(gm, self.example_inputs)
        if len(outputs) != len(self.reference):
            raise VerificationError(f"{len(self.reference)} outputs before, {len(outputs)} after")
        worst = 0.0
        for i, (before, after) in enumerate(zip(self.reference, outputs)):
            ok, diff = pass_.tolerance.allows(before, after)
            worst = max(worst, diff)
            if not ok:
                raise VerificationError(
                    f"output {i} moved by {diff:.3g} (max |before| {float(before.abs().max()):.3g}); "
                    f"tolerance rtol={pass_.tolerance.rtol}, atol={pass_.tolerance.atol}")
        record.max_output_diff = worst
        self.reference = outputs


class DumpInstrument(Instrument):
    """Writes NNN_passname_before.txt / _after.txt with the graph's code into `directory`."""

    def __init__(self, directory: str, only_changed: bool = True):
        self.directory = directory
        self.only_changed = only_changed
        self._before = ""

    def before_pass(self, pass_, gm, ctx, record):
        self._before = gm.code

    def after_pass(self, pass_, gm, ctx, result, record):
        if self.only_changed and not result.modified:
            return
        os.makedirs(self.directory, exist_ok=True)
        stem = os.path.join(self.directory, f"{record.index:03d}_{pass_.name}")
        with open(stem + "_before.txt", "w") as f:
            f.write(self._before)
        with open(stem + "_after.txt", "w") as f:
            f.write(gm.code)


class PrintOnChangeInstrument(Instrument):
    """Prints one line per pass that changed the graph, with its change summary."""

    def __init__(self, stream: TextIO | None = None):
        self.stream = stream or sys.stderr

    def after_pass(self, pass_, gm, ctx, result, record):
        if result.modified:
            summary = "; ".join(result.changes) or "modified"
            print(f"[graphopt] {pass_.name}: {summary}", file=self.stream)


class QualityInstrument(Instrument):
    """What each lossy pass (tolerance looser than EXACT) cost: on up to `batches`
    calibration batches, the Jensen-Shannon and KL divergence and top-1 agreement of the
    graph's first output after the pass against before it, and the perplexity before and
    after when the first input is token ids and the output next-token logits. Recorded in
    the pass log (`record.quality`), hence in the artifact's manifest."""

    def __init__(self, batches: int = 4):
        self.batches = batches
        self._outputs: list[torch.Tensor] | None = None

    def _run(self, gm, ctx) -> list[torch.Tensor]:
        with torch.no_grad():
            return [first_output(run(gm, batch)) for batch in ctx.calibration[: self.batches]]

    def before_pass(self, pass_, gm, ctx, record):
        if ctx.calibration and pass_.tolerance != EXACT and self._outputs is None:
            self._outputs = self._run(gm, ctx)

    def after_pass(self, pass_, gm, ctx, result, record):
        if not ctx.calibration or pass_.tolerance == EXACT:
            return
        if not result.modified:
            return
        from ..analysis.quality import divergence_of_logits
        after = self._run(gm, ctx)
        batches = ctx.calibration[: self.batches]
        record.quality = divergence_of_logits(self._outputs, after, [b[0] for b in batches])
        self._outputs = after


def first_output(out) -> torch.Tensor:
    """The first tensor of a (nested) output, as float32."""
    while isinstance(out, (tuple, list)):
        out = out[0]
    return out.float()
