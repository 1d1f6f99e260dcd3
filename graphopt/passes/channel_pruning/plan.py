"""What a channel-pruning export does: the plan (kept channels per consumer, ranks), what it costs, which
channels stay alive, and the importance scores that choose them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.fx as fx

from ...analysis.channels import ChannelAnalysis

aten = torch.ops.aten


def l1_importance(weight: torch.Tensor, in_dim: int) -> torch.Tensor:
    """Sum of |w| over everything but the input-channel dim."""
    return weight.detach().abs().transpose(0, in_dim).reshape(weight.shape[in_dim], -1).sum(1)


def l2_importance(weight: torch.Tensor, in_dim: int) -> torch.Tensor:
    """Euclidean norm over everything but the input-channel dim."""
    return weight.detach().transpose(0, in_dim).reshape(weight.shape[in_dim], -1).norm(dim=1)


BUDGETS = ("channels", "flops", "weights")


IMPORTANCE: dict[str, Callable[[torch.Tensor, int], torch.Tensor]] = {"l1": l1_importance, "l2": l2_importance}


# "activation": l1_importance x the input channel's RMS on calibration batches (or the example
# inputs): a column of small weights that reads a large activation still matters (Wanda's
# |W| * ||x||, summed over a column).
ACTIVATION = "activation"


@dataclass
class ChannelPlan:
    """What an export does: kept input channels per consumer (canonical ids) and a rank per
    channel that orders it inside its block (equal ranks keep the original order)."""

    keep: dict[int, set[int]]          # index into analysis.consumers -> kept channels
    rank: dict[int, int] = field(default_factory=dict)
    slack: float = 0.0                 # see `_widen`
    extra: set[int] = field(default_factory=set)   # computed by producers though no consumer keeps them
    concat_reads: bool = False         # consumers read whole parts of concatenations as their own (`_PartReads`)
    multiple: int = 16                 # the channel_multiple: a part splits only into pieces of multiples of it


def alive_channels(analysis: ChannelAnalysis, plan: ChannelPlan, placeholders: bool = True) -> set[int]:
    """The canonical channels producers still compute under `plan`; with `placeholders`, one
    channel of every producer that nobody reads and that cannot leave the graph (a conv/linear
    cannot have zero outputs; one that only feeds concatenations leaves them instead)."""
    kept = set(analysis.needed) | plan.extra
    for channels in plan.keep.values():
        kept |= channels
    if not placeholders:
        return kept
    for p in analysis.producers:
        canon = analysis.canonical(p.channels)
        if not kept.intersection(canon) and not _only_concatenated(p.node):
            kept.add(canon[0])
    return kept


def _only_concatenated(node: fx.Node) -> bool:
    return bool(node.users) and all(u.target is aten.cat.default for u in node.users)


def plan_cost(analysis: ChannelAnalysis, plan: ChannelPlan, full: dict[fx.Node, int]) -> int:
    """What the layers in `full` (node -> cost unpruned: MACs or weight elements) cost after
    `plan`: each scaled by its kept share of input columns and of output channels. Zero
    columns read for slack are not counted."""
    kept = alive_channels(analysis, plan)
    share = {node: 1.0 for node in full}
    for p in analysis.producers:
        if p.node in share:
            canon = analysis.canonical(p.channels)
            share[p.node] *= sum(c in kept for c in canon) / len(canon)
    for i, c in enumerate(analysis.consumers):
        if c.node in share:
            canon = analysis.canonical(c.channels)
            share[c.node] *= sum(ch in plan.keep[i] for ch in canon) / len(canon)
    return round(sum(full[node] * share[node] for node in full))
