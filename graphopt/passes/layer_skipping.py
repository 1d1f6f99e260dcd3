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

import torch.nn.functional as F
from tqdm.auto import tqdm

from ..analysis.sublayers import SkipEvaluator, Sublayer, find_sublayers, remove_sublayers
from ..errors import GraphoptError, PreconditionError
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
                  evaluator: SkipEvaluator | None = None, max_perplexity: float = math.inf) -> list[RemovalStep]:
    """The first `count` units `method` would remove, in order, each with the JS divergence
    and perplexity (on `batches`) of removing it together with all before it; stops before
    the first step whose perplexity exceeds `max_perplexity`."""
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
    ev = evaluator or SkipEvaluator(gm, batches, sublayers)
    if method == "finercut":
        return _greedy(ev, units, count, progress, max_perplexity)
    if method == "tail":
        order = [(float(u[-1].index), u) for u in reversed(units)]
    else:
        ev.rebase(frozenset())
        scorer = _block_influence if method == "bi" else _removal_js
        scored = [(scorer(ev, u), u) for u in tqdm(units, desc=f"score ({method})", unit="candidate",
                                                      disable=not progress, leave=False)]
        order = sorted(scored, key=lambda su: su[0])
    steps, removed = [], frozenset()
    ev.rebase(removed)
    for metric, unit in order[:count]:
        removed = removed | {s.index for s in unit}
        score = ev.score(removed)
        if score.perplexity > max_perplexity:
            break
        ev.rebase(removed)
        steps.append(RemovalStep(unit, score.js, score.perplexity, metric))
    return steps


def _block_influence(ev: SkipEvaluator, unit: tuple[Sublayer, ...]) -> float:
    total, rows = 0.0, 0
    for env in ev.base_envs:
        before = env[ev.stream_node[unit[0].index]]
        after = env[ev.add_node[unit[-1].index]]
        cos = F.cosine_similarity(before.reshape(-1, before.shape[-1]).float(),
                                  after.reshape(-1, after.shape[-1]).float(), dim=-1)
        total += float((1 - cos).sum())
        rows += cos.numel()
    return total / rows


def _removal_js(ev: SkipEvaluator, unit: tuple[Sublayer, ...]) -> float:
    return ev.score(frozenset(s.index for s in unit)).js


def _greedy(ev: SkipEvaluator, units: list, count: int, progress: bool,
            max_perplexity: float) -> list[RemovalStep]:
    steps, removed, remaining = [], frozenset(), list(units)
    bar = tqdm(total=sum(len(remaining) - k for k in range(count)), desc="finercut", unit="candidate",
               disable=not progress, leave=False)
    for _ in range(count):
        ev.rebase(removed)
        best = None
        for unit in remaining:
            score = ev.score(removed | {s.index for s in unit})
            bar.update()
            if best is None or score.js < best[0].js:
                best = (score, unit)
        score, unit = best
        if score.perplexity > max_perplexity:
            break
        remaining.remove(unit)
        removed = removed | {s.index for s in unit}
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
            evaluator = SkipEvaluator(gm, batches, sublayers) if batches else None
            limit = math.inf
            if o.max_perplexity_increase is not None:
                limit = evaluator.score(frozenset()).perplexity * (1 + o.max_perplexity_increase)
            self.steps = rank_removals(gm, batches, o.method, count, o.granularity, tuple(o.kinds),
                                       tuple(o.keep), o.progress, evaluator, limit)
        if not self.steps:
            return PassResult(gm, False, notes=["nothing removed within the budget"])
        removed = [s for step in self.steps for s in step.unit]
        freed = remove_sublayers(gm, removed)
        changes = [f"removed {s.label} {s.name}" for s in removed]
        changes.append(f"{len(removed)} sublayers, {freed / 1e6:.2f} MB of weights")
        notes = [f"{'+'.join(step.names)}: js {step.js:.4f}, perplexity {step.perplexity:.3f} (cumulative, "
                 f"calibration)" for step in self.steps if not math.isnan(step.js)]
        return PassResult(gm, True, changes, notes)
