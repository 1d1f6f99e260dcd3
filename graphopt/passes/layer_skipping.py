"""Layer skipping: remove whole attention / FFN sublayers or blocks of a residual network.

Rewrites (sublayers found by graph pattern, see `analysis.sublayers`):
    stream + sublayer(stream)  ->  stream        (its nodes and weights are then dropped)

Which to remove, under a budget of `sublayers` (a block counts as two) and/or
`max_perplexity_increase` (relative, on the calibration batches):
    "tail"              the last ones along the stream ("Reassessing Layer Pruning", 2024)
    "bi"                lowest Block Influence 1 - cos(x_in, x_out) (ShortGPT), one shot
    "finercut"          greedy: each step removes the candidate whose removal, on top of those
                        already removed, gives the output distribution closest (Jensen-Shannon)
                        to the unmodified model's (FinerCut, 2024)
    "finercut-oneshot"  FinerCut's scores from the unmodified model only, one pass
`remove=[names]` removes exactly those (names as `find_sublayers` reports them).
Needs calibration batches (token ids) except for "tail" with a sublayer count and `remove`.
Lossy: the pass log records the divergence and perplexity on the calibration batches.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from tqdm.auto import tqdm

from ..analysis.sublayers import SkipEvaluator, SkipWorkload, Sublayer, find_sublayers, remove_sublayers
from ..errors import GraphoptError, PreconditionError
from ..executors import Executor, LocalExecutor, Session
from .base import Pass, PassResult, Tolerance

METHODS = ("tail", "bi", "finercut", "finercut-oneshot")


@dataclass
class RemovalStep:
    """One removal in ranked order, with the quality of everything removed up to it."""

    unit: tuple[Sublayer, ...]
    js: float = math.nan          # vs the unmodified model on the calibration batches
    perplexity: float = math.nan
    metric: float = math.nan      # what the method ranked by (BI, JS, or position)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.unit]


def candidate_units(sublayers: list[Sublayer], granularity: str, kinds: tuple[str, ...],
                    keep: tuple[str, ...] = ()) -> list[tuple[Sublayer, ...]]:
    if granularity == "sublayer":
        units = [(s,) for s in sublayers if s.kind in kinds]
    elif granularity == "block":
        by_block: dict[int, list[Sublayer]] = {}
        for s in sublayers:
            by_block.setdefault(s.block, []).append(s)
        units = [tuple(members) for members in by_block.values()]
    else:
        raise GraphoptError(f"granularity must be 'sublayer' or 'block', got {granularity!r}")
    return [u for u in units if not any(s.name in keep for s in u)]


def rank_removals(gm, batches: list[tuple] | None, method: str, count: int,
                  granularity: str = "sublayer", kinds: tuple[str, ...] = ("attention", "ffn"),
                  keep: tuple[str, ...] = (), progress: bool = True,
                  evaluator: SkipEvaluator | None = None, max_perplexity: float = math.inf,
                  executor: Executor | None = None, session: Session | None = None) -> list[RemovalStep]:
    """The first `count` units `method` would remove, in order, each with the JS divergence
    and perplexity (on `batches`) of removing it together with all before it; stops before
    the first step whose perplexity exceeds `max_perplexity`. The evaluations run on
    `executor` (default: this process, reusing `evaluator` if given), or in `session`, an
    open session of a SkipWorkload."""
    if method not in METHODS:
        raise GraphoptError(f"unknown layer-skipping method {method!r}; choose one of {', '.join(METHODS)}")
    sublayers = find_sublayers(gm)
    units = candidate_units(sublayers, granularity, kinds, keep)
    count = min(count, len(units))
    if batches is None:
        if method != "tail":
            raise PreconditionError(f"layer skipping '{method}' needs calibration batches "
                                    "(compile(..., calibration=[...]))")
        return [RemovalStep(u, metric=float(u[-1].index)) for u in reversed(units)][:count]
    if session is None:
        with (executor or LocalExecutor()).session(SkipWorkload(gm, batches, sublayers, evaluator)) as session:
            return _rank(session, units, method, count, progress, max_perplexity)
    return _rank(session, units, method, count, progress, max_perplexity)


def _indices(unit: tuple[Sublayer, ...]) -> frozenset[int]:
    return frozenset(s.index for s in unit)


def _rank(session: Session, units: list, method: str, count: int, progress: bool,
          max_perplexity: float) -> list[RemovalStep]:
    if method == "finercut":
        return _greedy(session, units, count, progress, max_perplexity)
    if method == "tail":
        order = [(float(u[-1].index), u) for u in reversed(units)]
    else:
        if method == "bi":
            candidates = [("influence", tuple(s.index for s in u)) for u in units]
        else:
            candidates = [("score", frozenset(), _indices(u)) for u in units]
        with tqdm(total=len(units), desc=f"score ({method})", unit="candidate", disable=not progress,
                  leave=False) as bar:
            results = session.map(candidates, bar)
        metrics = [r if method == "bi" else r.js for r in results]
        order = sorted(zip(metrics, units), key=lambda su: su[0])
    steps, removed = [], frozenset()
    for metric, unit in order[:count]:
        [score] = session.map([("score", removed, removed | _indices(unit))])
        if score.perplexity > max_perplexity:
            break
        removed = removed | _indices(unit)
        steps.append(RemovalStep(unit, score.js, score.perplexity, metric))
    return steps


def _greedy(session: Session, units: list, count: int, progress: bool,
            max_perplexity: float) -> list[RemovalStep]:
    steps, removed, remaining = [], frozenset(), list(units)
    bar = tqdm(total=sum(len(remaining) - k for k in range(count)), desc="finercut", unit="candidate",
               disable=not progress, leave=False)
    for _ in range(count):
        scores = session.map([("score", removed, removed | _indices(unit)) for unit in remaining], bar)
        best = min(range(len(remaining)), key=lambda i: (scores[i].js, i))
        score, unit = scores[best], remaining[best]
        if score.perplexity > max_perplexity:
            break
        remaining.remove(unit)
        removed = removed | _indices(unit)
        steps.append(RemovalStep(unit, score.js, score.perplexity, score.js))
    bar.close()
    return steps


@dataclass
class LayerSkippingOptions:
    method: str = "finercut"
    sublayers: int | None = None                    # how many sublayers to remove (a block counts 2)
    max_perplexity_increase: float | None = None    # e.g. 0.10 = at most +10% on the calibration batches
    granularity: str = "sublayer"                   # "sublayer" or "block"
    kinds: tuple[str, ...] = ("attention", "ffn")   # which sublayers are candidates
    keep: tuple[str, ...] = ()                      # names never removed
    remove: tuple[str, ...] = ()                    # exactly these (skips the search)
    batches: int = 4                                # calibration batches used for scoring
    max_output_change: float = math.inf             # verify budget (x max|output|)
    progress: bool = True


class LayerSkipping(Pass):
    name = "layer_skipping"
    Options = LayerSkippingOptions

    def __init__(self, options=None, **overrides):
        super().__init__(options, **overrides)
        self.tolerance = Tolerance(rtol=self.options.max_output_change)
        self.steps: list[RemovalStep] = []

    def requires(self, gm, ctx):
        o = self.options
        if not o.remove and o.sublayers is None and o.max_perplexity_increase is None:
            raise PreconditionError("layer skipping needs a budget: sublayers=N and/or max_perplexity_increase=x, "
                                    "or remove=[names]")
        found = find_sublayers(gm)
        if not found:
            raise PreconditionError("no residual sublayers found (adds of a stream and the output of a linear "
                                    "layer, or of a convolution with an identity shortcut)")
        if not o.remove and not any(s.kind in o.kinds for s in found):
            kinds = sorted({s.kind for s in found})
            raise PreconditionError(f"the search ranks sublayers of kinds {', '.join(o.kinds)} on a language model's "
                                    f"next-token scores; this model's are {', '.join(kinds)} "
                                    f"({', '.join(s.name for s in found)}): name them with remove=[...]")

    def run(self, gm, ctx):
        o = self.options
        sublayers = find_sublayers(gm)
        batches = ctx.calibration[: o.batches] if ctx.calibration else None
        if o.remove:
            by_name = {s.name: s for s in sublayers}
            unknown = [n for n in o.remove if n not in by_name]
            if unknown:
                raise GraphoptError(f"no sublayer named {unknown}; found: {', '.join(by_name)}")
            self.steps = [RemovalStep((by_name[n],)) for n in o.remove]
        else:
            per_unit = 2 if o.granularity == "block" else 1
            count = (o.sublayers // per_unit) if o.sublayers is not None else len(sublayers)
            if o.max_perplexity_increase is not None and batches is None:
                raise PreconditionError("max_perplexity_increase needs calibration batches")
            self.steps = self._search(gm, ctx, batches, count)
        if not self.steps:
            return PassResult(gm, False, notes=["nothing removed within the budget"])
        return self._remove(gm)

    def _search(self, gm, ctx, batches, count: int) -> list[RemovalStep]:
        o = self.options
        args = (gm, batches, o.method, count, o.granularity, tuple(o.kinds), tuple(o.keep), o.progress)
        if batches is None:
            return rank_removals(*args)
        with ctx.executor.session(SkipWorkload(gm, batches, find_sublayers(gm))) as session:
            limit = math.inf
            if o.max_perplexity_increase is not None:
                [base] = session.map([("score", frozenset(), frozenset())])
                limit = base.perplexity * (1 + o.max_perplexity_increase)
            return rank_removals(*args, max_perplexity=limit, session=session)

    def _remove(self, gm) -> PassResult:
        removed = [s for step in self.steps for s in step.unit]
        freed = remove_sublayers(gm, removed)
        changes = [f"removed {s.label} {s.name}" for s in removed]
        changes.append(f"{len(removed)} sublayers, {freed / 1e6:.2f} MB of weights")
        notes = [f"{'+'.join(step.names)}: js {step.js:.4f}, perplexity {step.perplexity:.3f} (cumulative, "
                 f"calibration)" for step in self.steps if not math.isnan(step.js)]
        return PassResult(gm, True, changes, notes)
