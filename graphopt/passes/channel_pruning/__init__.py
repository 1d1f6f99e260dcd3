"""Channel pruning with channel reordering at export (UPSCALE, Wan et al., ICML 2023).

Rewrites (segments, producers and consumers from `analysis.channels`):
    consumer(x, W)            ->  consumer(x, W[:, kept])                 every input channel kept
    consumer(x, W)            ->  consumer(slice(x, a, b), W[:, kept])    kept channels contiguous
    consumer(x, W)            ->  consumer(index_select(x, kept), W[:, kept])   otherwise (a copy)
    producer(.., W, b)        ->  producer(.., W[used], b[used])          channels no reader needs
    per-channel constants     ->  the same channels, in the same order (batch norm, norm gains)
    cat([.., producer(..), ..]) -> cat([.., ..])    a layer none of whose channels anyone keeps

Pruning decides, per consumer, which input channels it keeps (lowest importance dropped).
A producer drops a channel only when no consumer keeps it and nothing else needs it (a
norm's statistics, a graph output), so the result equals the model with the dropped
consumer weight columns zeroed. Two modes:
    "constrained"    every consumer of a segment drops the same channels: no copies, but
                     consumers that would keep different channels cannot
    "unconstrained"  each consumer keeps its own channels; consumers whose kept channels are
                     not contiguous read them through a gather (a copy)
`budget="flops"` / `"weights"` makes `ratio` a share of the layers' multiply-accumulates /
weight elements instead, so constrained and unconstrained exports can be compared at equal
compute (the channel ratio is searched; see `pruning.ChannelPruning.plan`).
With `reorder=True` the channels of every block are laid out (producers' rows, per-channel
constants and consumers' columns permuted alike) so that most consumers' kept channels are
contiguous: a gather becomes a slice or disappears. The permutation is exact. The reordered
export also reads concatenations by their parts (`export._PartReads`):
    consumer(bn(cat(a, b, c))[kept])  ->  consumer(bn'(cat(a, c)))     kept = whole parts a, c
    cat(.., conv(x, W), ..)           ->  cat(.., conv(x, W[:16]), conv(x, W[16:]), ..)
                                          a part consumers read a 16-channel group at a time
so no copy is left where ONNX Runtime would have to leave its blocked layout for a Gather or
Slice and come back (a Concat of 16-aligned parts stays in it). `granularity=16` makes
consumers keep whole 16-channel groups of each block, which is what lets DenseNet consumers
read whole layers' outputs; with channel granularity they keep part of every layer's block
and the gathers stay.
Kept counts are rounded up to multiples of `channel_multiple` (default 16) wherever a
layer's width is one: ONNX Runtime's blocked conv kernels need that, and a 30%-pruned conv
of 22 channels measured slower than the unpruned one of 32.

`ChannelPermutation` applies a random permutation to every movable block: an exact pass
that shows the layout machinery (a Llama residual stream can be permuted since RMSNorm is
permutation-equivariant).

Modules: plan (what an export does and costs), export (the rewrite), reorder (channel orders),
pruning (the pass and its budget search), permutation (the exact random permutation).
"""
from .export import ExportStats, apply_plan
from .permutation import ChannelPermutation, ChannelPermutationOptions
from .plan import ACTIVATION, BUDGETS, IMPORTANCE, ChannelPlan, alive_channels, l1_importance, l2_importance, plan_cost
from .pruning import ChannelPruning, ChannelPruningOptions
from .reorder import contiguous_order, reorder_ranks

__all__ = [
    "ACTIVATION", "BUDGETS", "IMPORTANCE", "ChannelPermutation", "ChannelPermutationOptions", "ChannelPlan",
    "ChannelPruning", "ChannelPruningOptions", "ExportStats", "alive_channels", "apply_plan", "contiguous_order",
    "l1_importance", "l2_importance", "plan_cost", "reorder_ranks",
]
