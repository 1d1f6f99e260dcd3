"""The layout rewrite: apply a ChannelPlan to a graph (drop, order, slice, gather or read concatenations by
their parts) and replay view chains on the kept channels.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Callable

import torch
import torch.fx as fx

from ...analysis.channels import ChannelAnalysis, Consumer
from ...ir import ops
from ...ir.graph import add_constant, constant_value, eliminate_dead_code, infer_meta, remove_unused_attributes
from .plan import ChannelPlan, alive_channels

aten = torch.ops.aten


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
        key = (
            node.args[arg].target,
            tuple((dim, tuple(index or ()), tuple(zeros or ())) for dim, index, zeros in steps),
        )
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
