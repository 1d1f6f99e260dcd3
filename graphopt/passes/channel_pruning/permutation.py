"""ChannelPermutation: a random exact permutation of every movable channel block.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from ...analysis.channels import ChannelAnalysis
from ..base import Pass, PassResult
from .export import apply_plan
from .plan import ChannelPlan


@dataclass
class ChannelPermutationOptions:
    seed: int = 0


class ChannelPermutation(Pass):
    """Randomly permute the channels of every movable block (exact); see the package docstring
    (channel_pruning/__init__.py)."""

    name = "channel_permutation"
    Options = ChannelPermutationOptions

    def run(self, gm, ctx):
        analysis = ChannelAnalysis(gm)
        rng = random.Random(self.options.seed)
        rank: dict[int, int] = {}
        moved = 0
        for block in analysis.blocks():
            if len(block) < 2 or any(c in analysis.frozen for c in block):
                continue
            shuffled = list(block)
            rng.shuffle(shuffled)
            rank.update({c: r for r, c in enumerate(shuffled)})
            moved += shuffled != block
        if not moved:
            return PassResult(gm, False, [], ["no movable block of two or more channels"])
        keep = {i: set(analysis.canonical(c.channels)) for i, c in enumerate(analysis.consumers)}
        apply_plan(gm, analysis, ChannelPlan(keep, rank))
        return PassResult(gm, True, [f"permuted {moved} channel blocks"])
