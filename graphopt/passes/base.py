"""The pass contract: Pass, PassResult, Tolerance, PassContext.

A pass is a class with declared metadata (name, typed Options dataclass, tolerance, the
analyses it needs, whether it needs example inputs), optional `requires`/`ensures` hooks,
and `run(gm, ctx) -> PassResult`. Passes rewrite; they never lower.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.fx as fx

from ..errors import GraphoptError, PassContractError
from ..executors import Executor, LocalExecutor


@dataclass(frozen=True)
class Tolerance:
    """Outputs after a pass must satisfy max|after - before| <= atol + rtol * max|before|."""

    rtol: float = 1e-5
    atol: float = 0.0

    def allows(self, before: torch.Tensor, after: torch.Tensor) -> tuple[bool, float]:
        if before.shape != after.shape or before.dtype != after.dtype:
            return False, float("inf")
        if not before.is_floating_point():
            diff = float((before != after).sum())
            return diff == 0, diff
        scale = float(before.abs().max()) if before.numel() else 0.0
        diff = float((before - after).abs().max()) if before.numel() else 0.0
        return diff <= self.atol + self.rtol * scale, diff


EXACT = Tolerance(rtol=1e-5)


@dataclass
class PassResult:
    """What a pass returns. `modified` must be honest: the manager checks it."""

    graph_module: fx.GraphModule
    modified: bool
    changes: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class PassContext:
    """What passes may read besides the graph: example inputs, calibration batches (each a
    tuple of inputs like example_inputs), an analysis cache, and the executor their searches'
    candidate evaluations run on (graphopt.executors)."""

    example_inputs: tuple[torch.Tensor, ...] | None = None
    calibration: list[tuple] | None = None
    analyses: dict[type, Any] = field(default_factory=dict)
    executor: Executor = field(default_factory=LocalExecutor)     # where searches evaluate candidates

    def analysis(self, kind: type, gm: fx.GraphModule):
        """Run (or reuse) an analysis class: `kind(gm, ctx)` is computed once per graph state."""
        from ..ir.graph import fingerprint
        key = (kind, fingerprint(gm))
        if key not in self.analyses:
            self.analyses[key] = kind(gm, self)
        return self.analyses[key]


def option(default: Any, help: str, *, choices: tuple | None = None, at_least: float | None = None,
           below: float | None = None, or_callable: bool = False) -> Any:
    """A pass option: a dataclass field with its help text and the values it accepts, which
    `Pass.__init__` checks (choices; at_least <= value [< below]; a callable if or_callable).
    The command line builds its flags from the same fields (graphopt/cli/common.py)."""
    return field(default=default, metadata={"help": help, "choices": choices, "at_least": at_least,
                                            "below": below, "or_callable": or_callable})


def check_options(owner: str, options: Any) -> None:
    """Raise a one-line GraphoptError naming the first option outside what its field accepts."""
    for f in dataclasses.fields(options):
        meta, value = f.metadata, getattr(options, f.name)
        if "help" not in meta or (meta["or_callable"] and callable(value)):
            continue
        choices, low, high = meta["choices"], meta["at_least"], meta["below"]
        if choices is not None and value not in choices:
            also = " or a callable" if meta["or_callable"] else ""
            raise GraphoptError(f"{owner} {f.name} must be one of {', '.join(map(repr, choices))}{also}, "
                                f"got {value!r}")
        if high is not None and not low <= value < high:
            raise GraphoptError(f"{owner} {f.name} must be in [{low}, {high}), got {value!r}")
        if low is not None and value < low:
            raise GraphoptError(f"{owner} {f.name} must be >= {low}, got {value!r}")


@dataclass
class NoOptions:
    """For passes without options."""


class Pass:
    """Base class of every pass. Subclasses set the class attributes and implement `run`."""

    name: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    tolerance: ClassVar[Tolerance] = EXACT
    needs_example_inputs: ClassVar[bool] = False
    requires_analyses: ClassVar[tuple[type, ...]] = ()

    def __init__(self, options: Any = None, **overrides: Any):
        if options is None:
            options = self.Options()
        if not isinstance(options, self.Options):
            raise TypeError(f"{type(self).__name__} takes {self.Options.__name__}, got {type(options).__name__}")
        self.options = dataclasses.replace(options, **overrides) if overrides else options
        check_options(type(self).__name__, self.options)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "name" not in cls.__dict__:
            cls.name = cls.__name__

    def requires(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        """Raise PreconditionError if the pass cannot run on `gm`."""

    def ensures(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        """Raise PostconditionError if the produced graph breaks the pass's promise."""

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        raise NotImplementedError

    def __call__(self, gm: fx.GraphModule, ctx: PassContext | None = None) -> PassResult:
        ctx = ctx or PassContext()
        if self.needs_example_inputs and ctx.example_inputs is None:
            from ..errors import PreconditionError
            raise PreconditionError(f"pass '{self.name}' needs example inputs")
        self.requires(gm, ctx)
        result = self.run(gm, ctx)
        if not isinstance(result, PassResult):
            raise PassContractError(
                f"pass '{self.name}' returned {type(result).__name__}; passes must return PassResult")
        if result.modified:
            result.graph_module.graph.lint()
            result.graph_module.recompile()
        self.ensures(result.graph_module, ctx)
        return result

    def __repr__(self) -> str:
        opts = dataclasses.asdict(self.options) if dataclasses.is_dataclass(self.options) else {}
        return f"{self.name}({', '.join(f'{k}={v!r}' for k, v in opts.items())})"
