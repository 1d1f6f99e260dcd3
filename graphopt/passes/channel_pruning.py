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
compute (the channel ratio is searched; see `ChannelPruning.plan`).
With `reorder=True` the channels of every block are laid out (producers' rows, per-channel
constants and consumers' columns permuted alike) so that most consumers' kept channels are
contiguous: a gather becomes a slice or disappears. The permutation is exact. The reordered
export also reads concatenations by their parts (`_PartReads`):
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
"""
from __future__ import annotations

import fnmatch
import operator
import random
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.fx as fx

from ..analysis.channels import ChannelAnalysis, Consumer, input_channel_rms
from ..analysis.cost import node_macs
from ..errors import GraphoptError, PreconditionError
from ..ir import ops
from ..ir.graph import add_constant, constant_value, eliminate_dead_code, infer_meta, remove_unused_attributes
from .base import Pass, PassResult, Tolerance

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


@dataclass
class ExportStats:
    consumers_full: int = 0
    consumers_slice: int = 0
    consumers_gather: int = 0
    consumers_concat: int = 0          # read a concatenation of whole parts instead of a copy of a concatenation
    producer_channels_before: int = 0
    producer_channels_after: int = 0
    consumer_columns_before: int = 0
    consumer_columns_after: int = 0
    constants_rewritten: int = 0
    zero_columns: int = 0              # columns a consumer reads as zeros to avoid a copy (slack)
    producers_removed: int = 0         # layers whose whole output nobody keeps, taken out of concatenations

    @property
    def changed(self) -> bool:
        return self.constants_rewritten + self.consumers_slice + self.consumers_gather + self.consumers_concat + \
            self.producers_removed > 0


# -- the layout rewrite ----------------------------------------------------------------------
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


def apply_plan(gm: fx.GraphModule, analysis: ChannelAnalysis, plan: ChannelPlan) -> ExportStats:
    """Rewrite `gm` to `plan`: drop channels nobody keeps, order blocks by rank, give each
    consumer its kept channels by full read, slice or gather. Returns what it did."""
    kept = alive_channels(analysis, plan)
    placeholder = kept - alive_channels(analysis, plan, placeholders=False)
    block_of = {c: b for b, block in enumerate(analysis.blocks()) for c in block}

    def positions(channels: list[int]) -> list[int]:
        canon = analysis.canonical(channels)
        first: dict[int, int] = {}
        for pos, c in enumerate(canon):
            first.setdefault(block_of[c], pos)
        alive = [pos for pos, c in enumerate(canon) if c in kept]
        return sorted(alive, key=lambda pos: (first[block_of[canon[pos]]], plan.rank.get(canon[pos], 0), pos))

    stats = ExportStats()
    # (node, arg) -> steps (dim, index to select, or None and positions to zero)
    edits: dict[tuple[fx.Node, int], list[tuple[int, list[int] | None, list[int] | None]]] = {}

    def edit(node: fx.Node, arg: int, dim: int, index: list[int], size: int) -> None:
        if index != list(range(size)):
            edits.setdefault((node, arg), []).append((dim, index, None))

    removed = [p for p in analysis.producers if not positions(p.channels)]     # only concatenated (see alive_channels)
    weight_args = {p.node: (p.node.args.index(p.weight), None if p.bias is None else p.node.args.index(p.bias),
                            p.out_dim) for p in analysis.producers}
    input_arg = {id(c): c.node.args.index(c.input) for c in analysis.consumers}
    for p in analysis.producers:
        index = positions(p.channels)
        stats.producer_channels_before += len(p.channels)
        stats.producer_channels_after += len(index)
        if not index:
            continue
        edit(p.node, p.node.args.index(p.weight), p.out_dim, index, len(p.channels))
        if p.bias is not None:
            edit(p.node, p.node.args.index(p.bias), 0, index, len(p.channels))
    for prm in analysis.params:
        edit(prm.node, prm.arg, prm.dim, positions(prm.channels), len(prm.channels))
    reads = []
    for i, c in enumerate(analysis.consumers):
        index = positions(c.channels)
        canon = analysis.canonical(c.channels)
        read = [j for j, pos in enumerate(index) if canon[pos] in plan.keep[i]]
        placeholders = {j for j, pos in enumerate(index) if canon[pos] in placeholder}
        if placeholders and _is_range(wider := sorted(set(read) | placeholders)) and \
                (len(wider) == len(index) or not _is_range(read)):
            read = wider            # read a placeholder channel through a zero column, not around it by a copy
        read, zeros = _widen([j for j in read if j not in placeholders], len(index), plan.slack, read)
        stats.consumer_columns_before += len(c.channels)
        stats.consumer_columns_after += len(read) - len(zeros)
        stats.zero_columns += len(zeros)
        edit(c.node, c.node.args.index(c.weight), c.in_dim, [index[j] for j in read], len(c.channels))
        if zeros:
            edits.setdefault((c.node, c.node.args.index(c.weight)), []).append((c.in_dim, None, zeros))
        reads.append((c, read, len(index)))

    graph = gm.graph
    stats.constants_rewritten = len(edits)
    rewritten: dict[tuple, str] = {}     # a tied weight (embedding = LM head) edited alike stays one tensor
    replaced = {node.args[arg] for node, arg in edits}
    for (node, arg), steps in edits.items():
        key = (node.args[arg].target, tuple((dim, tuple(index or ()), tuple(zeros or ())) for dim, index, zeros in steps))
        if key not in rewritten:
            value = constant_value(gm, node.args[arg])
            for dim, index, zeros in steps:
                if index is not None:
                    value = value.index_select(dim, torch.tensor(index, dtype=torch.long))
                else:
                    value = value.index_fill(dim, torch.tensor(zeros, dtype=torch.long), 0)
            rewritten[key] = add_constant(gm, f"{node.args[arg].target}_pruned", value)
        with graph.inserting_before(node):
            node.update_arg(arg, graph.get_attr(rewritten[key]))
    for old in replaced:
        if not old.users:
            graph.erase_node(old)
    part_reads = _PartReads(gm, analysis, lambda n: len(positions(analysis.layouts[n].channels)),
                            plan.multiple, weight_args, input_arg)
    narrowing = [(c, read) for c, read, width in reads if len(read) < width]
    stats.consumers_full = len(reads) - len(narrowing)
    if plan.concat_reads:
        part_reads.split_parts(narrowing)
    for c, read in narrowing:
        readers, source = part_reads.readers(c.node), part_reads.input_of(c)
        axis = analysis.layouts[c.input].axis
        with graph.inserting_before(readers[0]):
            if plan.concat_reads and (narrowed := part_reads.read(c, read)) is not None:
                stats.consumers_concat += 1
            elif _is_range(read):
                stats.consumers_slice += 1
                narrowed = graph.call_function(aten.slice.Tensor, (source, axis, read[0], read[0] + len(read)))
            else:
                stats.consumers_gather += 1
                idx = graph.get_attr(add_constant(gm, f"{c.name}_kept_channels", torch.tensor(read, dtype=torch.long)))
                narrowed = graph.call_function(aten.index_select.default, (source, axis, idx))
        narrowed.meta.update({k: c.node.meta[k] for k in ("nn_module_stack", "stack_trace") if k in c.node.meta})
        for node in readers:
            node.update_arg(input_arg[id(c)], narrowed)
    for p in removed:                               # its block leaves the concatenations; DCE drops the layer
        for cat in list(p.node.users):
            cat.update_arg(0, [t for t in cat.args[0] if t is not p.node])
    stats.producers_removed = len(removed)
    for shape_arg in analysis.shape_args:
        node = shape_arg.node
        shape = list(node.args[1])
        shape[shape_arg.index] = len(positions(analysis.layouts[node].channels))
        node.update_arg(1, shape)
    for group_arg in analysis.group_args:        # a depthwise conv has one group per channel left
        group_arg.node.update_arg(group_arg.index, len(positions(analysis.layouts[group_arg.node].channels)))
    if stats.consumers_concat or part_reads.pieces:        # the chains and concatenations they left behind
        eliminate_dead_code(gm)
    for node in graph.nodes:
        if node.op == "call_function":
            infer_meta(gm, node)
    remove_unused_attributes(gm)
    return stats


def _chain_input(node: fx.Node, analysis: ChannelAnalysis, made: set[fx.Node] = frozenset()) -> fx.Node | None:
    """The laid-out tensor `node` maps channel by channel (a norm, an activation, a pool, an
    op with a constant), or None. `made`: concatenations made since the analysis, laid out
    like `node`."""
    x = node.args[0] if node.args else None
    if node not in analysis.layouts or (x not in made and (
            x not in analysis.layouts or analysis.layouts[x].axis != analysis.layouts[node].axis)):
        return None
    if any(a is not x and a.op != "get_attr" for a in node.all_input_nodes):
        return None
    if node.target is operator.getitem:
        return x if node.args[1] == 0 else None
    if node.target in ops.BATCH_NORMS or node.target in ops.BINARY or node.target in ops.CHANNELWISE or \
            (node.target in ops.POOLS_2D and node.target is not aten.max_pool2d_with_indices.default):
        return x
    return None


class _PartReads:
    """The reordered export's reads of concatenations (DenseNet-style segments).

    A consumer that reads a concatenation (through norms and activations) keeping whole parts
    of it reads a concatenation of just those parts, built from the producers' outputs, instead
    of a gather from the full one: ONNX Runtime has no zero-copy slice, and a Gather or Slice
    takes a tensor out of its blocked (NCHWc) layout and back, while a Concat of 16-aligned
    parts stays in it. A part that consumers read in pieces (a stem or transition conv read a
    group at a time) is split first: its producer becomes one conv per piece (the same MACs),
    when every piece but the last is a multiple of `multiple` channels. Nested concatenations
    flatten; the ones nobody reads any more are removed.
    """

    def __init__(self, gm: fx.GraphModule, analysis: ChannelAnalysis, width: Callable[[fx.Node], int],
                 multiple: int, weight_args: dict[fx.Node, tuple[int, int | None, int]], input_arg: dict[int, int]):
        self.gm, self.analysis, self._width, self.multiple = gm, analysis, width, multiple
        self.input_arg = input_arg              # id(consumer) -> which argument of its node is its input
        self.weight_args = weight_args          # producer node -> (weight arg, bias arg, output dim)
        self.widths: dict[fx.Node, int] = {}    # nodes made here -> channel count
        self.splits: set[fx.Node] = set()       # concatenations of a split part's pieces
        self.pieces: dict[fx.Node, list[fx.Node]] = {}   # a split producer -> the producers of its pieces
        self.owner: dict[fx.Node, fx.Node] = {}          # and back

    def width(self, node: fx.Node) -> int:
        return self.widths[node] if node in self.widths else self._width(node)

    def source(self, node: fx.Node) -> tuple[list[fx.Node], fx.Node]:
        """The channel-by-channel chain that ends at `node` (each link read only by the next),
        source side first, and the node it starts from."""
        chain = []
        while node.target is not aten.cat.default:
            prev = _chain_input(node, self.analysis, self.splits) \
                if node.op == "call_function" and self._one_reader(node) else None
            if prev is None:
                break
            chain.append(node)
            node = prev
        return chain[::-1], node

    def input_of(self, c: Consumer) -> fx.Node:
        """`c`'s input now (a split part's is the concatenation of its pieces)."""
        return self.readers(c.node)[0].args[self.input_arg[id(c)]]

    def readers(self, node: fx.Node) -> list[fx.Node]:
        """What computes `node` now: the producers of its pieces if it was split."""
        return self.pieces.get(node, [node])

    def _one_reader(self, node: fx.Node) -> bool:
        return len({self.owner.get(u, u) for u in node.users}) == 1

    def leaves(self, node: fx.Node, axis: int) -> list[fx.Node]:
        if node.target is aten.cat.default and (node in self.splits or (
                node in self.analysis.layouts and self.analysis.layouts[node].axis == axis)):
            return [leaf for part in node.args[0] for leaf in self.leaves(part, axis)]
        return [node]

    def _spans(self, c: Consumer, read: list[int], src: fx.Node | None = None):
        """(part, `read` positions inside it, its width) for each part of what `c` reads."""
        src = self.source(self.input_of(c))[1] if src is None else src
        offset = 0
        for leaf in self.leaves(src, self.analysis.layouts[c.input].axis):
            w = self.width(leaf)
            yield leaf, [j - offset for j in read if offset <= j < offset + w], w
            offset += w

    def split_parts(self, reads: list[tuple[Consumer, list[int]]]) -> None:
        """Split the parts that consumers read in pieces into one producer per piece, where that
        lets the consumer read whole parts only and every piece stays a multiple of channels."""
        cuts: dict[fx.Node, set[int]] = {}
        producer_of: dict[fx.Node, tuple | None] = {}
        for c, read in reads:
            wanted: dict[fx.Node, set[int]] = {}
            for leaf, inside, w in self._spans(c, read):
                if not inside or len(inside) == w:
                    continue
                member = set(inside)
                marks = {k for k in range(1, w) if (k in member) != (k - 1 in member)}
                if leaf not in producer_of:
                    producer_of[leaf] = self._producer_chain(leaf)
                if producer_of[leaf] is None or any(k % self.multiple for k in marks):
                    break
                wanted[leaf] = marks
            else:
                for leaf, marks in wanted.items():
                    cuts.setdefault(leaf, set()).update(marks)
        for leaf, marks in cuts.items():
            bounds = [0, *sorted(marks), self.width(leaf)]
            self._split(leaf, *producer_of[leaf], list(zip(bounds, bounds[1:])))

    def _producer_chain(self, leaf: fx.Node) -> tuple[fx.Node, list[fx.Node]] | None:
        """The producer `leaf` comes from and the channel-by-channel chain between them (each
        link but `leaf` read only by the next), or None."""
        chain, node = [], leaf
        while node not in self.weight_args:
            prev = _chain_input(node, self.analysis) if node.op == "call_function" and \
                (node is leaf or len(node.users) == 1) else None
            if prev is None:
                return None
            chain.append(node)
            node = prev
        return None if chain and len(node.users) != 1 else (node, chain[::-1])

    def _split(self, leaf: fx.Node, producer: fx.Node, chain: list[fx.Node], pieces: list[tuple[int, int]]) -> None:
        graph = self.gm.graph
        w_arg, b_arg, out_dim = self.weight_args[producer]
        rank = len(leaf.meta["val"].shape)
        axis = self.analysis.layouts[leaf].axis
        outs = []
        with graph.inserting_before(leaf):
            for a, b in pieces:
                args = list(producer.args)
                for k, dim in ((w_arg, out_dim), (b_arg, 0)):
                    if k is not None and isinstance(args[k], fx.Node):
                        value = constant_value(self.gm, args[k]).narrow(dim, a, b - a)
                        args[k] = graph.get_attr(add_constant(self.gm, f"{args[k].target}_{a}_{b}", value))
                x = graph.call_function(producer.target, tuple(args), dict(producer.kwargs))
                x.meta.update({k: producer.meta[k] for k in ("nn_module_stack", "stack_trace") if k in producer.meta})
                self.pieces.setdefault(producer, []).append(x)
                self.owner[x] = producer
                x = _replay(self.gm, chain, x, list(range(a, b)), axis, rank)
                self.widths[x] = b - a
                outs.append(x)
            joined = graph.call_function(aten.cat.default, (outs, axis))
        self.splits.add(joined)
        self.widths[joined] = pieces[-1][1]
        leaf.replace_all_uses_with(joined)
        for node in [*reversed(chain), producer]:
            graph.erase_node(node)

    def read(self, c: Consumer, read: list[int]) -> fx.Node | None:
        """`c`'s input as a concatenation of the whole parts it reads (inserted before it), or None."""
        chain, src = self.source(self.input_of(c))
        axis = self.analysis.layouts[c.input].axis
        chosen = []
        for leaf, inside, w in self._spans(c, read, src):
            if len(inside) == w and w:
                chosen.append(leaf)
            elif inside:
                return None
        x = chosen[0] if len(chosen) == 1 else self.gm.graph.call_function(aten.cat.default, (chosen, axis))
        return _replay(self.gm, chain, x, read, axis, len(c.input.meta["val"].shape))


def _replay(gm: fx.GraphModule, chain: list[fx.Node], x: fx.Node, index: list[int], axis: int, rank: int) -> fx.Node:
    """`chain` (channel-by-channel ops, source side first) applied to `x`, which holds the
    `index` positions of the chain's channels: per-channel constants keep those positions."""
    graph = gm.graph
    positions = torch.tensor(index, dtype=torch.long)
    for node in chain:
        per_channel = set(ops.BATCH_NORMS.get(node.target, ()))
        args = [x if k == 0 else a for k, a in enumerate(node.args)]
        for k, a in enumerate(args[1:], 1):
            if not (isinstance(a, fx.Node) and a.op == "get_attr"):
                continue
            value = constant_value(gm, a)
            dim = None if value is None else 0 if k in per_channel else axis - (rank - value.dim())
            if dim is None or dim < 0 or value.shape[dim] == 1:
                continue
            args[k] = graph.get_attr(add_constant(gm, f"{a.target}_read", value.index_select(dim, positions)))
        x = graph.call_function(node.target, tuple(args), dict(node.kwargs))
        x.meta.update({k: node.meta[k] for k in ("nn_module_stack", "stack_trace") if k in node.meta})
    return x


def _is_range(xs: list[int]) -> bool:
    return xs == list(range(xs[0], xs[0] + len(xs))) if xs else True


def _widen(read: list[int], width: int, slack: float, wider: list[int] | None = None) -> tuple[list[int], list[int]]:
    """Trade a copy for a few zero weight columns: with slack s, a consumer keeping k of
    `width` channels reads all of them if width <= (1+s)k (no op at all), or the smallest
    range covering its channels if that range <= (1+s)k (a slice instead of a gather). The
    channels it did not keep get zero columns, so outputs are unchanged. `wider` (a superset
    of `read`) is what it reads without slack."""
    wider = read if wider is None else wider
    kept = set(read)
    if not wider or len(wider) == width or slack <= 0:
        return wider, [k for k, j in enumerate(wider) if j not in kept]
    limit = (1 + slack) * len(read)
    if width <= limit:
        wide = list(range(width))
    elif wider[-1] - wider[0] + 1 <= limit:
        wide = list(range(wider[0], wider[-1] + 1))
    else:
        return wider, [k for k, j in enumerate(wider) if j not in kept]
    return wide, [k for k, j in enumerate(wide) if j not in kept]


# -- choosing what to keep -------------------------------------------------------------------
def contiguous_order(channels: list[int], sets: list[set[int]]) -> list[int]:
    """An order of `channels` in which as many of `sets` as possible are contiguous runs.

    UPSCALE's ordering: the largest sets become nodes of a graph whose edges weigh the
    channels two sets share; the heaviest acyclic paths are laid out set by set as
    (shared with the previous, own, shared with the next); each region is ordered the same
    way for the smaller sets inside it. Channels in no set keep their order at the end.
    """
    universe = set(channels)
    family = []
    for s in sets:
        part = frozenset(s & universe)
        if 0 < len(part) < len(universe) and part not in family:
            family.append(part)
    if not family:
        return list(channels)
    maximal = [s for s in family if not any(s < t for t in family)]
    paths = _heaviest_paths(maximal)
    order: list[int] = []
    placed: set[int] = set()

    def lay(region: set[int]) -> None:
        region -= placed
        if region:
            sub = contiguous_order([c for c in channels if c in region], [set(s) for s in family])
            order.extend(sub)
            placed.update(sub)

    for path in paths:
        for k, s in enumerate(path):
            nxt = path[k + 1] if k + 1 < len(path) else frozenset()
            lay(set(s - nxt))
            lay(set(s & nxt))
    order.extend(c for c in channels if c not in placed)
    return order


def _heaviest_paths(sets: list[frozenset]) -> list[list[frozenset]]:
    """Greedy maximum-weight path cover: take edges by shared-channel count, keeping every
    node's degree <= 2 and no cycles; largest paths first."""
    n = len(sets)
    edges = sorted(((len(sets[i] & sets[j]), i, j) for i in range(n) for j in range(i + 1, n)
                    if sets[i] & sets[j]), reverse=True)
    root = list(range(n))

    def find(x):
        while root[x] != x:
            root[x] = root[root[x]]
            x = root[x]
        return x

    adjacent: dict[int, list[int]] = {i: [] for i in range(n)}
    for _, i, j in edges:
        if len(adjacent[i]) < 2 and len(adjacent[j]) < 2 and find(i) != find(j):
            adjacent[i].append(j)
            adjacent[j].append(i)
            root[find(i)] = find(j)
    paths, seen = [], set()
    for start in sorted(range(n), key=lambda i: -len(sets[i])):
        if start in seen or len(adjacent[start]) > 1:
            continue
        path, prev, cur = [], None, start
        while cur is not None:
            path.append(cur)
            seen.add(cur)
            cur, prev = next((x for x in adjacent[cur] if x != prev), None), cur
        paths.append(path)
    paths.sort(key=lambda p: -sum(len(sets[i]) for i in p))
    return [[sets[i] for i in p] for p in paths]


def reorder_ranks(analysis: ChannelAnalysis, keep: dict[int, set[int]]) -> dict[int, int]:
    """Ranks that lay each movable block out with `contiguous_order` over its consumers' kept sets."""
    kept = set(analysis.needed).union(*keep.values()) if keep else set(analysis.needed)
    readers: dict[int, list[set[int]]] = {}
    for i, c in enumerate(analysis.consumers):
        for ch in set(analysis.canonical(c.channels)):
            readers.setdefault(ch, []).append(keep[i])
    rank: dict[int, int] = {}
    for block in analysis.blocks():
        if any(c in analysis.frozen for c in block):
            continue
        alive = [c for c in block if c in kept]
        sets = {id(s): s for c in alive for s in readers.get(c, [])}
        for r, c in enumerate(contiguous_order(alive, list(sets.values()))):
            rank[c] = r
    return rank


@dataclass
class ChannelPruningOptions:
    ratio: float = 0.3                 # fraction of each consumer's input channels dropped (budget="channels")
    # "channels": `ratio` is the share of every consumer's input channels dropped; "flops" /
    # "weights": the share of the prunable layers' multiply-accumulates / weight elements
    # removed, reached by searching the channel ratio (so both modes can be compared at equal cost).
    budget: str = "channels"
    mode: str = "unconstrained"        # or "constrained"
    reorder: bool = True               # UPSCALE layout (unconstrained mode)
    slack: float = 0.0                 # extra zero columns (fraction) a consumer may read to avoid a copy
    importance: str | Callable = "l1"  # "l1", "l2", "activation", or f(weight, in_dim) -> score per input channel
    scope: str = "layer"               # "layer": each consumer drops `ratio`; "global": ranked across layers
    exclude: tuple[str, ...] = ()      # consumer names (module paths, fnmatch patterns) left whole
    min_channels: int = 1              # every consumer keeps at least this many
    # Kept counts are rounded up to multiples of this where the layer's width is one: ONNX
    # Runtime runs a conv in its fast blocked (NCHWc) layout only when both its input and
    # output channel counts are multiples of 16 (8 on AVX2) or below it.
    channel_multiple: int = 16
    # Unconstrained: consumers keep or drop whole groups of this many channels of a block (a
    # run of a producer's output channels). With 16 and DenseNet layers of 16 new channels, a
    # consumer reads whole layers' outputs, and the reordered export reads them as one
    # concatenation (no gather: ORT's blocked kernels keep their layout). 1: any channels.
    granularity: int = 1


class ChannelPruning(Pass):
    """Drop the least important input channels of every consumer; see the module docstring."""

    name = "channel_pruning"
    Options = ChannelPruningOptions
    tolerance = Tolerance(rtol=float("inf"))     # lossy; its cost is measured by the quality instrument

    def __init__(self, options=None, **overrides):
        super().__init__(options, **overrides)
        o = self.options
        if o.mode not in ("constrained", "unconstrained"):
            raise GraphoptError(f"ChannelPruning mode must be 'constrained' or 'unconstrained', got {o.mode!r}")
        if o.budget not in BUDGETS:
            raise GraphoptError(f"ChannelPruning budget must be one of {BUDGETS}, got {o.budget!r}")
        if o.scope not in ("layer", "global"):
            raise GraphoptError(f"ChannelPruning scope must be 'layer' or 'global', got {o.scope!r}")
        if not 0.0 <= o.ratio < 1.0:
            raise GraphoptError(f"ChannelPruning ratio must be in [0, 1), got {o.ratio}")
        if o.channel_multiple < 1 or o.min_channels < 1 or o.granularity < 1:
            raise GraphoptError("ChannelPruning channel_multiple, min_channels and granularity must be >= 1")
        if not callable(o.importance) and o.importance not in (*IMPORTANCE, ACTIVATION):
            raise GraphoptError(f"ChannelPruning importance must be one of {sorted(IMPORTANCE) + [ACTIVATION]} "
                                "or a callable")
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
            f"({1 - s.consumer_columns_after / max(s.consumer_columns_before, 1):.1%} dropped), producer output channels "
            f"{s.producer_channels_before} -> {s.producer_channels_after}; layer MACs "
            f"{macs_before / 1e6:.1f}M -> {macs_after / 1e6:.1f}M ({1 - macs_after / max(macs_before, 1):.1%} removed)"
            + ("" if ratios is None else f"; {self.options.budget} budget {self.options.ratio:.0%} reached with "
               f"consumers at channel ratios {ratios[0]:.3f}-{ratios[1]:.3f}"),
            f"consumers read all kept channels: {s.consumers_full}, a slice: {s.consumers_slice}, "
            f"a gather: {s.consumers_gather}, a concatenation of whole parts: {s.consumers_concat}"
            + (f"; {s.zero_columns} zero columns read instead of copies" if s.zero_columns else "")
            + (f"; {s.producers_removed} layers whose whole output nobody keeps left their concatenations"
               if s.producers_removed else ""),
        ]
        notes = [f"{seg.describe()}; {reason}" for seg in analysis.segments if seg.consumers
                 for reason in analysis.explain(seg)[:1]]
        dropped = 1 - s.consumer_columns_after / max(s.consumer_columns_before, 1)
        if self.options.budget == "channels" and self.options.channel_multiple > 1 and dropped < 0.5 * self.options.ratio:
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
        channel_score = _mean_scores(scores, {i: analysis.canonical(c.channels) for i, c in enumerate(analysis.consumers)})

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


@dataclass
class ChannelPermutationOptions:
    seed: int = 0


class ChannelPermutation(Pass):
    """Randomly permute the channels of every movable block (exact); see the module docstring."""

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
