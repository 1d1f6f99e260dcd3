"""ChannelPruning: the pass, its options and its budget search over the channel ratio.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Callable

import torch
import torch.fx as fx

from ...analysis.channels import ChannelAnalysis, Consumer, input_channel_rms
from ...analysis.cost import node_macs
from ...errors import GraphoptError, PreconditionError
from ...ir.graph import constant_value
from ..base import Pass, PassResult, Tolerance, option
from .export import ExportStats, apply_plan
from .plan import ACTIVATION, BUDGETS, IMPORTANCE, ChannelPlan, l1_importance, plan_cost
from .reorder import reorder_ranks


@dataclass
class ChannelPruningOptions:
    ratio: float = option(0.3, "fraction of each consumer's input channels dropped (of the layer MACs / weights "
                               "with budget flops / weights)", at_least=0.0, below=1.0)
    budget: str = option("channels", "what ratio is a share of: every consumer's input channels, or the prunable "
                                     "layers' MACs / weight elements (reached by searching the channel ratio)",
                         choices=BUDGETS)
    mode: str = option("unconstrained", "unconstrained: any channels; constrained: channels a whole segment shares",
                       choices=("unconstrained", "constrained"))
    reorder: bool = option(True, "UPSCALE channel reordering (unconstrained mode)")
    slack: float = option(0.0, "extra zero columns (fraction) a consumer may read to avoid a copy", at_least=0.0)
    importance: str | Callable = option("l1", "l1, l2, activation, or f(weight, in_dim) -> score per input channel",
                                        choices=(*IMPORTANCE, ACTIVATION), or_callable=True)
    scope: str = option("layer", "layer: every consumer drops the same share; global: channels ranked across layers",
                        choices=("layer", "global"))
    exclude: tuple[str, ...] = option((), "consumers left whole (module paths, fnmatch patterns)")
    min_channels: int = option(1, "channels every consumer keeps at least", at_least=1)
    # Kept counts are rounded up to multiples of this where the layer's width is one: ONNX
    # Runtime runs a conv in its fast blocked (NCHWc) layout only when both its input and
    # output channel counts are multiples of 16 (8 on AVX2) or below it.
    channel_multiple: int = option(16, "kept channel counts are rounded up to multiples of this", at_least=1)
    # With 16 and DenseNet layers of 16 new channels, a consumer reads whole layers' outputs,
    # and the reordered export reads them as one concatenation (no gather: ORT's blocked
    # kernels keep their layout).
    granularity: int = option(1, "unconstrained: consumers keep or drop whole groups of this many channels of a "
                                 "block (16: whole 16-channel DenseNet layers, read without copies)", at_least=1)


class ChannelPruning(Pass):
    """Drop the least important input channels of every consumer; see the package docstring
    (channel_pruning/__init__.py)."""

    name = "channel_pruning"
    Options = ChannelPruningOptions
    tolerance = Tolerance(rtol=float("inf"))     # lossy; its cost is measured by the quality instrument

    def __init__(self, options=None, **overrides):
        super().__init__(options, **overrides)
        self.stats: ExportStats | None = None

    def run(self, gm, ctx):
        analysis = ChannelAnalysis(gm)
        rms = None
        if self.options.importance == ACTIVATION and self.options.ratio > 0:
            batches = ctx.calibration or ([ctx.example_inputs] if ctx.example_inputs is not None else None)
            if not batches:
                raise PreconditionError("channel_pruning with importance='activation' needs calibration batches "
                                        "or example inputs")
            rms = input_channel_rms(gm, analysis, batches)
        plan, ratios = self.plan(gm, analysis, rms)
        macs = {node: node_macs(node, gm) for node in _layers(analysis)}
        macs_before, macs_after = sum(macs.values()), plan_cost(analysis, plan, macs)
        if self.options.reorder and self.options.mode == "unconstrained":
            plan.rank = reorder_ranks(analysis, plan.keep)
            plan.concat_reads, plan.multiple = True, self.options.channel_multiple
        self.stats = s = apply_plan(gm, analysis, plan)
        changes = [
            f"{self.options.mode}{' + reordered' if plan.rank else ''}: consumer input channels "
            f"{s.consumer_columns_before} -> {s.consumer_columns_after} "
            f"({1 - s.consumer_columns_after / max(s.consumer_columns_before, 1):.1%} dropped), "
            f"producer output channels "
            f"{s.producer_channels_before} -> {s.producer_channels_after}; layer MACs "
            f"{macs_before / 1e6:.1f}M -> {macs_after / 1e6:.1f}M ({1 - macs_after / max(macs_before, 1):.1%} removed)"
            + (
                ""
                if ratios is None
                else f"; {self.options.budget} budget {self.options.ratio:.0%} reached with "
                f"consumers at channel ratios {ratios[0]:.3f}-{ratios[1]:.3f}"
            ),
            f"consumers read all kept channels: {s.consumers_full}, a slice: {s.consumers_slice}, "
            f"a gather: {s.consumers_gather}, a concatenation of whole parts: {s.consumers_concat}"
            + (f"; {s.zero_columns} zero columns read instead of copies" if s.zero_columns else "")
            + (
                f"; {s.producers_removed} layers whose whole output nobody keeps left their concatenations"
                if s.producers_removed
                else ""
            ),
        ]
        notes = [f"{seg.describe()}; {reason}" for seg in analysis.segments if seg.consumers
                 for reason in analysis.explain(seg)[:1]]
        dropped = 1 - s.consumer_columns_after / max(s.consumer_columns_before, 1)
        if (
            self.options.budget == "channels"
            and self.options.channel_multiple > 1
            and dropped < 0.5 * self.options.ratio
        ):
            notes.insert(0, f"only {dropped:.1%} of the {self.options.ratio:.0%} asked for was dropped: pinned "
                            "channels stay (below) and kept counts round up to multiples of channel_multiple="
                            f"{self.options.channel_multiple} where a layer narrows (constrained: per block); "
                            "budget='flops' searches a ratio that reaches a share of the MACs, channel_multiple=1 "
                            "rounds nothing")
        return PassResult(gm, s.changed, changes, notes[:20])

    def _scores(self, gm, c: Consumer, rms: dict | None) -> torch.Tensor:
        o = self.options
        fn = o.importance if callable(o.importance) else IMPORTANCE.get(o.importance, l1_importance)
        scores = torch.as_tensor(fn(constant_value(gm, c.weight), c.in_dim), dtype=torch.float64)
        if o.importance == ACTIVATION:
            scores = scores * rms[c.input].double()
        if scores.shape != (len(c.channels),):
            raise GraphoptError(f"importance returned shape {tuple(scores.shape)} for {c.name}; "
                                f"expected ({len(c.channels)},)")
        return scores / scores.mean().clamp_min(1e-30)

    def plan(self, gm, analysis: ChannelAnalysis,
             rms: dict | None = None) -> tuple[ChannelPlan, tuple[float, float] | None]:
        """`choose` at the options' ratio, or, for a flops/weights budget, a plan that removes
        at least `ratio` of that cost: the channel ratio is bisected to the step where the
        plan crosses the budget, then `_between` mixes the plans on either side of it (their
        two ratios are returned)."""
        o = self.options
        if o.budget == "channels" or o.ratio == 0:
            return self.choose(gm, analysis, rms), None
        scores = self._consumer_scores(gm, analysis, rms)
        layers = _layers(analysis)
        full = {n: node_macs(n, gm) for n in layers} if o.budget == "flops" else \
            {n: constant_value(gm, w).numel() for n, w in layers.items()}
        target = (1 - o.ratio) * sum(full.values())
        lo, hi = 0.0, 0.99
        best = self.choose(gm, analysis, rms, ratio=hi, scores=scores)
        if (least := plan_cost(analysis, best, full)) > target:
            raise GraphoptError(f"ChannelPruning cannot remove {o.ratio:.0%} of the {o.budget}: dropping 99% of "
                                f"every consumer's channels removes {1 - least / sum(full.values()):.1%} "
                                "(pinned channels, excluded layers, min_channels)")
        for _ in range(12):
            mid = (lo + hi) / 2
            candidate = self.choose(gm, analysis, rms, ratio=mid, scores=scores)
            if plan_cost(analysis, candidate, full) <= target:
                hi, best = mid, candidate
            else:
                lo = mid
        low = self.choose(gm, analysis, rms, ratio=lo, scores=scores)
        return self._between(analysis, low, best, full, target, scores), (lo, hi)

    def _between(self, analysis: ChannelAnalysis, low: ChannelPlan, high: ChannelPlan, full: dict, target: float,
                 scores: dict[int, torch.Tensor]) -> ChannelPlan:
        """A plan between `low` (over the target cost) and `high` (within it): one ratio step
        can move many layers at once (kept counts are multiples of 16), so switch consumers
        (constrained: a segment's consumers together) from low's choice to high's, largest
        saving first, until one more switch reaches the target; take the smallest that does."""
        o = self.options
        groups: dict[int, list[int]] = {}
        for i, c in enumerate(analysis.consumers):
            key = analysis.segment_of(c.channels[0]).index if o.mode == "constrained" else i
            groups.setdefault(key, []).append(i)
        pending = [g for g in groups.values() if any(low.keep[i] != high.keep[i] for i in g)]
        channel_score = _mean_scores(
            scores, {i: analysis.canonical(c.channels) for i, c in enumerate(analysis.consumers)}
        )

        def mixed(switched: list[list[int]]) -> ChannelPlan:
            keep = {i: set(s) for i, s in low.keep.items()}
            for group in switched:
                for i in group:
                    keep[i] = set(high.keep[i])
            extra = self._align_producers(analysis, keep, channel_score) if o.mode == "unconstrained" else set()
            return ChannelPlan(keep, slack=o.slack, extra=extra)

        base = plan_cost(analysis, low, full)
        saving = {id(g): base - plan_cost(analysis, mixed([g]), full) for g in pending}
        switched: list[list[int]] = []
        current = base
        while pending:
            fitting = sorted((g for g in pending if current - saving[id(g)] <= target), key=lambda g: saving[id(g)])
            for group in fitting[:8]:               # savings are not exactly additive: check the smallest few
                plan = mixed(switched + [group])
                if plan_cost(analysis, plan, full) <= target:
                    return plan
            group = max(pending, key=lambda g: saving[id(g)])
            pending.remove(group)
            switched.append(group)
            plan = mixed(switched)
            current = plan_cost(analysis, plan, full)
            if current <= target:
                return plan
        return high

    def _consumer_scores(self, gm, analysis: ChannelAnalysis, rms: dict | None) -> dict[int, torch.Tensor]:
        """Importance per input channel of every consumer not excluded (index -> scores)."""
        o = self.options
        return {i: self._scores(gm, c, rms) for i, c in enumerate(analysis.consumers)
                if not any(fnmatch.fnmatch(c.name, p) for p in o.exclude)}

    def choose(self, gm, analysis: ChannelAnalysis, rms: dict | None = None, ratio: float | None = None,
               scores: dict[int, torch.Tensor] | None = None) -> ChannelPlan:
        """The kept canonical input channels per consumer index, and the channels producers
        compute only to keep their counts aligned, dropping `ratio` (default: the options')
        of each consumer's channels (`rms`: input_channel_rms, for importance='activation';
        `scores`: precomputed `_consumer_scores`). Reordering ranks are added by `run`."""
        o = self.options
        ratio = o.ratio if ratio is None else ratio
        canon = {i: analysis.canonical(c.channels) for i, c in enumerate(analysis.consumers)}
        keep = {i: set(canon[i]) for i in range(len(analysis.consumers))}
        scores = self._consumer_scores(gm, analysis, rms) if scores is None else scores
        whole = set(canon) - set(scores)
        if ratio == 0:
            return ChannelPlan(keep, slack=o.slack)
        if o.mode == "unconstrained":
            cut = _global_cut([s for s in scores.values()], ratio) if o.scope == "global" else None
            groups_of = _channel_groups(analysis, o.granularity)
            for i, s in scores.items():
                n_keep = max(o.min_channels, round((1 - ratio) * len(s))) if cut is None else \
                    max(o.min_channels, int((s > cut).sum()))
                n_keep = _aligned(n_keep, len(s), o)
                if o.granularity > 1:
                    keep[i] = _keep_groups(canon[i], s, n_keep, groups_of)
                    continue
                order = torch.argsort(s, descending=True, stable=True)[:n_keep].tolist()
                keep[i] = {canon[i][j] for j in order}
            extra = self._align_producers(analysis, keep, _mean_scores(scores, canon))
            return ChannelPlan(keep, slack=o.slack, extra=extra)
        # constrained: a segment drops the same channels from all its consumers
        pinned = set(analysis.needed) | {ch for i in whole for ch in canon[i]}
        channel_score = _mean_scores(scores, canon)
        readers: dict[int, list[int]] = {}
        for i in scores:
            for ch in set(canon[i]):
                readers.setdefault(ch, []).append(i)
        remaining = {i: len(set(canon[i])) for i in scores}
        segments = [seg for seg in analysis.segments if seg.consumers]
        if o.scope == "global":
            pools = [([ch for seg in segments for ch in seg.channels], sum(len(seg.channels) for seg in segments))]
        else:
            pools = [(seg.channels, len(seg.channels)) for seg in segments]
        drop: set[int] = set()
        for channels, size in pools:
            free = sorted((ch for ch in channels if ch in channel_score and ch not in pinned),
                          key=lambda ch: channel_score[ch])
            budget = round(ratio * size)
            for ch in free:
                if budget <= 0:
                    break
                if all(remaining[i] > o.min_channels for i in readers[ch]):   # no consumer left empty
                    drop.add(ch)
                    budget -= 1
                    for i in readers[ch]:
                        remaining[i] -= 1
        if o.channel_multiple > 1:                  # each producer's kept channels: a multiple again
            for block in analysis.blocks():
                gone = sorted((ch for ch in block if ch in drop), key=lambda ch: -channel_score.get(ch, 0.0))
                while gone and len(block) % o.channel_multiple == 0 and \
                        (len(block) - len([c for c in block if c in drop])) % o.channel_multiple:
                    drop.discard(gone.pop(0))
        for i in scores:
            keep[i] = set(canon[i]) - drop
        return ChannelPlan(keep, slack=o.slack)

    def _align_producers(self, analysis: ChannelAnalysis, keep: dict[int, set[int]],
                         score: dict[int, float]) -> set[int]:
        """Unconstrained: the channels any consumer keeps (or a norm needs) are what producers
        compute; where a block's count of them is not a multiple, add its best remaining
        channels (returned), and let consumers that read the whole block read them too (no copy)."""
        m = self.options.channel_multiple
        added: set[int] = set()
        if m <= 1:
            return added
        used = set(analysis.needed).union(*keep.values())
        for block in analysis.blocks():
            alive = {c for c in block if c in used}
            if len(block) % m or len(alive) % m == 0 or not alive:
                continue
            extra = sorted((c for c in block if c not in alive), key=lambda c: -score.get(c, 0.0))
            extra = extra[: m - len(alive) % m]
            added.update(extra)
            for channels in keep.values():
                if alive <= channels:
                    channels.update(extra)
        return added


def _layers(analysis: ChannelAnalysis) -> dict[fx.Node, fx.Node]:
    """Every conv/linear/embedding the analysis knows (producers and consumers) -> its weight."""
    return {p.node: p.weight for p in analysis.producers} | {c.node: c.weight for c in analysis.consumers}


def _channel_groups(analysis: ChannelAnalysis, granularity: int) -> dict[int, int]:
    """Canonical channel -> its group: runs of `granularity` channels of a block whose size is a
    multiple of it (a DenseNet layer's new channels, a stage's stream); other channels alone."""
    group: dict[int, int] = {}
    for block in analysis.blocks():
        size = granularity if granularity > 1 and len(block) % granularity == 0 else 1
        for k, ch in enumerate(block):
            group[ch] = block[k - k % size]
    return group


def _keep_groups(channels: list[int], scores: torch.Tensor, n_keep: int, group_of: dict[int, int]) -> set[int]:
    """A consumer's kept channels as whole groups, by mean score, best first, until at least
    `n_keep` channels are kept."""
    members: dict[int, list[int]] = {}
    for j, ch in enumerate(channels):
        members.setdefault(group_of.get(ch, ch), []).append(j)
    ranked = sorted(members.values(), key=lambda js: -float(scores[js].mean()))
    kept: list[int] = []
    for js in ranked:
        if len(kept) >= n_keep:
            break
        kept += js
    return {channels[j] for j in kept}


def _aligned(n: int, width: int, o: ChannelPruningOptions) -> int:
    m = o.channel_multiple
    return min(width, -(-n // m) * m) if m > 1 and width % m == 0 else n


def _mean_scores(scores: dict[int, torch.Tensor], canon: dict[int, list[int]]) -> dict[int, float]:
    """Each channel's importance averaged over the consumers that read it."""
    totals: dict[int, list[float]] = {}
    for i, s in scores.items():
        for j, ch in enumerate(canon[i]):
            totals.setdefault(ch, []).append(float(s[j]))
    return {ch: sum(v) / len(v) for ch, v in totals.items()}


def _global_cut(scores: list[torch.Tensor], ratio: float) -> float:
    everything = torch.cat(scores)
    k = int(ratio * everything.numel())
    return float(torch.kthvalue(everything, k).values) if k > 0 else float("-inf")
