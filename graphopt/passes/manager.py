"""PassManager: runs a list of passes once or to a fixed point, checks each pass's
contract (PassResult, honest `modified`), runs instruments, and names the failing pass
and the ones before it when something goes wrong."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch.fx as fx
from tqdm.auto import tqdm

from ..analysis.cost import graph_cost
from ..errors import GraphoptError, PassContractError, PassError
from ..ir.graph import fingerprint
from .base import Pass, PassContext
from .instruments import Instrument


@dataclass
class PassRecord:
    """One pass execution, as the manifest and `graphopt inspect` show it."""

    name: str
    index: int
    iteration: int
    modified: bool = False
    seconds: float = 0.0
    nodes_before: int = 0
    nodes_after: int = 0
    bytes_before: int = 0                # parameter bytes
    bytes_after: int = 0
    macs_before: int = 0                 # multiply-accumulates at the example inputs' shapes
    macs_after: int = 0
    changes: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    options: str = ""
    max_output_diff: float | None = None
    quality: dict | None = None          # lossy passes with calibration: see QualityInstrument

    def to_json(self) -> dict:
        return dict(self.__dict__)


@dataclass
class PipelineResult:
    graph_module: fx.GraphModule
    records: list[PassRecord]

    @property
    def modified(self) -> bool:
        return any(r.modified for r in self.records)


class PassManager:
    """Runs `passes` in order; with `fixed_point=True` repeats the list until no pass
    modifies the graph, at most `max_iterations` times."""

    def __init__(self, passes: list[Pass], instruments: list[Instrument] | None = None,
                 fixed_point: bool = False, max_iterations: int = 8, progress: bool = False):
        for p in passes:
            if not isinstance(p, Pass):
                raise TypeError(f"PassManager takes Pass instances, got {p!r}")
        self.passes = list(passes)
        self.instruments = list(instruments or [])
        self.fixed_point = fixed_point
        self.max_iterations = max_iterations
        self.progress = progress

    def run(self, gm: fx.GraphModule, ctx: PassContext | None = None) -> PipelineResult:
        ctx = ctx or PassContext()
        for inst in self.instruments:
            inst.start(gm, ctx)
        records: list[PassRecord] = []
        iterations = self.max_iterations if self.fixed_point else 1
        for iteration in range(iterations):
            changed = False
            bar = tqdm(self.passes, desc="passes", unit="pass", disable=not self.progress, leave=False)
            for p in bar:
                bar.set_postfix_str(p.name)
                cost = graph_cost(gm)
                record = PassRecord(p.name, len(records), iteration, options=repr(p),
                                    nodes_before=len(gm.graph.nodes), bytes_before=cost.weight_bytes,
                                    macs_before=cost.macs)
                gm = self._run_one(p, gm, ctx, record, records)
                records.append(record)
                changed |= record.modified
            if not changed:
                break
        else:
            if self.fixed_point and changed:
                raise PassError(f"no fixed point after {self.max_iterations} iterations of "
                                f"[{', '.join(p.name for p in self.passes)}]")
        return PipelineResult(gm, records)

    def _run_one(self, p: Pass, gm, ctx, record: PassRecord, done: list[PassRecord]):
        before = fingerprint(gm)
        history = ", ".join(r.name for r in done) or "none"
        start = time.perf_counter()
        try:
            for inst in self.instruments:
                inst.before_pass(p, gm, ctx, record)
            result = p(gm, ctx)
            after = fingerprint(result.graph_module)
            if result.modified and after == before:
                raise PassContractError("reported modified=True but the graph and its constants are unchanged")
            if not result.modified and after != before:
                raise PassContractError("changed the graph but reported modified=False")
            record.modified = result.modified
            record.changes = list(result.changes)
            record.notes = list(result.notes)
            record.nodes_after = len(result.graph_module.graph.nodes)
            cost = graph_cost(result.graph_module) if result.modified else None
            record.bytes_after = cost.weight_bytes if cost else record.bytes_before
            record.macs_after = cost.macs if cost else record.macs_before
            for inst in self.instruments:
                inst.after_pass(p, result.graph_module, ctx, result, record)
        except GraphoptError as exc:
            error_type = type(exc) if isinstance(exc, PassError) else PassError
            raise error_type(f"pass '{p.name}' failed (passes before it: {history}): {exc}") from exc
        except Exception as exc:
            raise PassError(f"pass '{p.name}' failed (passes before it: {history}): "
                            f"{type(exc).__name__}: {exc}") from exc
        record.seconds = time.perf_counter() - start
        return result.graph_module
