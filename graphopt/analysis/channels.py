"""Channel dependency analysis: which channels of which tensors are the same channel.

Read-only; the channel pruning pass builds on it. Terms (UPSCALE, Wan et al. 2023):
    producer  a conv / linear / addmm / embedding with a constant weight whose output
              channels start a tensor's channel layout
    consumer  a conv / linear / addmm with a constant weight that reads a laid-out tensor;
              it can keep any subset of its input channels (prune weight columns)
    user      any op in between: elementwise ops, norms, pools, views, concatenation
    segment   the channels that add/mul/concat mix together, with their producers and
              consumers (a ResNet stage, a DenseNet block, a Llama residual stream, an FFN)

The walk gives every tensor it understands a `Layout`: the channel axis and one channel id
per position. Producers mint fresh ids; elementwise ops between two laid-out tensors tie
their channels position by position (union-find); `cat` along the channel axis concatenates
layouts. Nothing is matched by module name, so any traced CNN or transformer is analysed.

Two kinds of pins say what a rewrite may not do with a channel:
    needed  it may not be dropped: it reaches a reduction over channels (mean/var of a
            norm, softmax), so dropping it would change other channels' values. Permuting
            it is still exact (norms are permutation-equivariant).
    frozen  it may neither be dropped nor moved: it reaches a graph output, an op this
            analysis does not understand, or a view that splits the channel axis (heads).
Each pin keeps a reason naming the node, so `explain()` can say why a channel stays.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from ..ir import ops
from ..ir.graph import constant_value, describe, module_path

aten = torch.ops.aten



@dataclass
class Layout:
    """A tensor's channel axis and the channel id at each position along it."""

    axis: int
    channels: list[int]


@dataclass
class Producer:
    node: fx.Node
    weight: fx.Node
    bias: fx.Node | None
    out_dim: int          # the weight dim indexed by output channel
    channels: list[int]


@dataclass
class Consumer:
    node: fx.Node
    input: fx.Node        # the laid-out tensor it reads
    weight: fx.Node
    in_dim: int           # the weight dim indexed by input channel
    channels: list[int]   # the layout it reads, position by position

    @property
    def name(self) -> str:
        return module_path(self.node) or self.node.name


@dataclass
class ChannelParam:
    """A constant indexed by channel: batch-norm statistics, norm gains, a depthwise kernel,
    a per-channel scale in an elementwise op. `arg` is its position in `node.args`."""

    node: fx.Node
    arg: int
    dim: int
    channels: list[int]


@dataclass
class ShapeArg:
    """A view whose shape argument spells the channel count at `index`."""

    node: fx.Node
    index: int


@dataclass
class Segment:
    """Channels mixed together by add/mul/cat, and the producers/consumers around them."""

    index: int
    channels: list[int]                    # canonical ids, in first-seen order
    producers: list[Producer] = field(default_factory=list)
    consumers: list[Consumer] = field(default_factory=list)
    tensors: list[fx.Node] = field(default_factory=list)

    def describe(self) -> str:
        names = lambda items: ", ".join(module_path(i.node) or i.node.name for i in items[:6]) + \
            (f", ... ({len(items)})" if len(items) > 6 else "")
        return (f"segment {self.index}: {len(self.channels)} channels; producers [{names(self.producers)}]; "
                f"consumers [{names(self.consumers)}]")


class _UnionFind:
    def __init__(self):
        self.parent: list[int] = []

    def make(self, n: int) -> list[int]:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return list(range(start, start + n))

    def find(self, x: int) -> int:
        root = x
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[x] != root:
            self.parent[x], x = root, self.parent[x]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def _shape(node) -> tuple | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _dims(dim, rank: int) -> list[int]:
    dims = dim if isinstance(dim, (list, tuple)) else [dim]
    return [d % rank for d in dims]


class ChannelAnalysis:
    """Walks the graph once and builds layouts, producers, consumers, params and segments.

    `ChannelAnalysis(gm)` or `ctx.analysis(ChannelAnalysis, gm)`. Canonical channel ids come
    from `self.find(id)`; `self.needed` / `self.frozen` map canonical ids to a reason.
    """

    def __init__(self, gm: fx.GraphModule, ctx=None):
        self.gm = gm
        self._ties = _UnionFind()
        self.layouts: dict[fx.Node, Layout] = {}
        self.producers: list[Producer] = []
        self.consumers: list[Consumer] = []
        self.params: list[ChannelParam] = []
        self.shape_args: list[ShapeArg] = []
        self.group_args: list[ShapeArg] = []   # depthwise convs: `groups` (args[index]) is the channel count
        self._needed: dict[int, str] = {}
        self._frozen: dict[int, str] = {}
        self._blocks: list[list[int]] | None = None
        for node in gm.graph.nodes:
            if node.op == "call_function":
                self._visit(node)
            elif node.op == "output":
                for arg in _flatten(node.args[0]):
                    self._freeze(arg, "reaches a graph output")
        for node, layout in self.layouts.items():
            canon = self.canonical(layout.channels)
            if len(set(canon)) != len(canon):
                self._freeze(node, f"the same channel appears twice along the channel axis of {describe(node)}")
        self.needed = self._canonical(self._needed)
        self.frozen = self._canonical(self._frozen)
        for c, reason in self.frozen.items():
            self.needed.setdefault(c, reason)
        self.segments = self._segments()

    # -- queries ---------------------------------------------------------------------------
    def find(self, channel: int) -> int:
        return self._ties.find(channel)

    def canonical(self, channels: list[int]) -> list[int]:
        return [self._ties.find(c) for c in channels]

    def segment_of(self, channel: int) -> Segment:
        return self._segment_by_channel[self.find(channel)]

    def explain(self, segment: Segment) -> list[str]:
        """Why channels of `segment` are pinned, one line per distinct reason."""
        reasons: dict[str, int] = {}
        for c in segment.channels:
            why = self.frozen.get(c) or self.needed.get(c)
            if why:
                kind = "frozen" if c in self.frozen else "needed"
                reasons[f"{kind}: {why}"] = reasons.get(f"{kind}: {why}", 0) + 1
        return [f"{n} channels {r}" for r, n in reasons.items()]

    def blocks(self) -> list[list[int]]:
        """Runs of canonical channels that every layout holds whole and in the same order.

        Reordering may permute channels inside a block only: a block appears as one run
        wherever it appears (a ResNet stage's stream is one block; each DenseNet layer's new
        channels are one block inside every concatenation that holds them).
        """
        if self._blocks is not None:
            return self._blocks
        conflict = -1
        succ: dict[int, int] = {}
        pred: dict[int, int] = {}
        for layout in self.layouts.values():
            canon = self.canonical(layout.channels)
            for i, c in enumerate(canon):
                nxt = canon[i + 1] if i + 1 < len(canon) else conflict
                prv = canon[i - 1] if i > 0 else conflict
                succ[c] = nxt if succ.get(c, nxt) == nxt else conflict
                pred[c] = prv if pred.get(c, prv) == prv else conflict
        linked = {c: d for c, d in succ.items() if d != conflict and pred.get(d) == c}
        followers = set(linked.values())
        starts = [c for c in succ if c not in followers]
        out = []
        for c in starts:
            chain = [c]
            while chain[-1] in linked:
                chain.append(linked[chain[-1]])
            out.append(chain)
        self._blocks = out
        return out

    # -- the walk --------------------------------------------------------------------------
    def _visit(self, node: fx.Node) -> None:
        target = node.target
        tracked = [a for a in _flatten((node.args, node.kwargs)) if a in self.layouts]
        if target in ops.METADATA:
            return
        if target in (aten.conv2d.default, aten.conv1d.default, aten.convolution.default):
            return self._conv(node)
        if target is aten.linear.default:
            return self._matmul(node, node.args[0], node.args[1], node.args[2] if len(node.args) > 2 else None,
                                in_dim=1, out_dim=0)
        if target is aten.addmm.default:
            return self._matmul(node, node.args[1], node.args[2], node.args[0], in_dim=0, out_dim=1)
        if target is aten.mm.default:
            return self._matmul(node, node.args[0], node.args[1], None, in_dim=0, out_dim=1)
        if target is aten.embedding.default:
            weight = node.args[0]
            if constant_value(self.gm, weight) is not None and not tracked:
                return self._produce(node, weight, None, out_dim=1, axis=len(_shape(node)) - 1)
        if not tracked:
            return
        x = node.args[0]
        if target in ops.CHANNELWISE and x in self.layouts:
            return self._same(node, x)
        if target in ops.POOLS_2D and x in self.layouts and self.layouts[x].axis == 1:
            return self._same(node, x)
        if target in (aten.pad.default, aten.constant_pad_nd.default) and x in self.layouts:
            if self.layouts[x].axis < len(_shape(x)) - len(node.args[1]) // 2:
                return self._same(node, x)               # pads spatial dims only (TF-style "same" padding)
        if target in ops.BATCH_NORMS and x in self.layouts and self.layouts[x].axis == 1:
            for i in ops.BATCH_NORMS[target]:
                self._param(node, i, x)
            return self._same(node, x)
        if target in ops.LAYER_NORMS and x in self.layouts:
            layout = self.layouts[x]
            if layout.axis == len(_shape(x)) - 1 and len(node.args[1]) == 1:
                self._pin(self._needed, layout.channels, f"normalised together by {describe(node)}")
                for i in ops.LAYER_NORMS[target]:
                    self._param(node, i, x)
                return self._same(node, x)
        if target in ops.BINARY:
            return self._binary(node)
        if target is operator.getitem and x in self.layouts:
            return self._same(node, x) if node.args[1] == 0 and isinstance(x.meta.get("val"), (tuple, list)) \
                else self._freeze_inputs(node, tracked)
        if target in ops.VIEWS or target in (aten.flatten.using_ints, aten.squeeze.dim, aten.unsqueeze.default):
            return self._view(node, tracked)
        if target in (aten.transpose.int, aten.permute.default, aten.t.default):
            return self._permute(node, tracked)
        if target in ops.REDUCTIONS and x in self.layouts:
            return self._reduction(node)
        if target in ops.SOFTMAXES and x in self.layouts:
            layout = self.layouts[x]
            if node.args[1] % len(_shape(x)) == layout.axis:
                self._pin(self._needed, layout.channels, f"softmax over channels at {describe(node)}")
            return self._same(node, x)
        if target is aten.cat.default:
            return self._cat(node, tracked)
        self._freeze_inputs(node, tracked)

    def _produce(self, node, weight, bias, out_dim: int, axis: int) -> None:
        w = constant_value(self.gm, weight)
        channels = self._ties.make(w.shape[out_dim])
        self.producers.append(Producer(node, weight, bias, out_dim, channels))
        self.layouts[node] = Layout(axis, channels)

    def _conv(self, node: fx.Node) -> None:
        x, weight = node.args[0], node.args[1]
        bias = node.args[2] if len(node.args) > 2 else None
        if node.target is aten.convolution.default:
            transposed, groups = node.args[6], node.args[8]
        else:
            transposed, groups = False, (node.args[6] if len(node.args) > 6 else 1)
        w = constant_value(self.gm, weight)
        if transposed or w is None or (bias is not None and constant_value(self.gm, bias) is None):
            return self._freeze_inputs(node, [x] if x in self.layouts else [])
        if groups != 1:
            if x in self.layouts and groups == w.shape[0] == _shape(x)[1] and w.shape[1] == 1:
                self._param(node, 1, x)                      # depthwise: a per-channel kernel
                if bias is not None:
                    self._param(node, 2, x)
                self.group_args.append(ShapeArg(node, 8 if node.target is aten.convolution.default else 6))
                return self._same(node, x)
            return self._freeze_inputs(node, [x] if x in self.layouts else [])
        if x in self.layouts and self.layouts[x].axis == 1:
            self.consumers.append(Consumer(node, x, weight, 1, list(self.layouts[x].channels)))
        self._produce(node, weight, bias, out_dim=0, axis=1)

    def _matmul(self, node, x, weight, bias, in_dim: int, out_dim: int) -> None:
        w = constant_value(self.gm, weight)
        if w is None or w.dim() != 2 or (bias is not None and constant_value(self.gm, bias) is None):
            return self._freeze_inputs(node, [a for a in (x, weight) if a in self.layouts])
        if x in self.layouts:
            if self.layouts[x].axis == len(_shape(x)) - 1:
                self.consumers.append(Consumer(node, x, weight, in_dim, list(self.layouts[x].channels)))
            else:
                self._freeze(x, f"read along a non-channel axis by {describe(node)}")
        self._produce(node, weight, bias, out_dim=out_dim, axis=len(_shape(node)) - 1)

    def _same(self, node, x) -> None:
        self.layouts[node] = Layout(self.layouts[x].axis, list(self.layouts[x].channels))

    def _param(self, node, arg: int, x) -> None:
        if arg < len(node.args) and isinstance(node.args[arg], fx.Node):
            value = constant_value(self.gm, node.args[arg])
            if value is None:
                return self._freeze(
                    x, f"per-channel operand {node.args[arg].name} of {describe(node)} is not a constant"
                )
            self.params.append(ChannelParam(node, arg, 0, list(self.layouts[x].channels)))

    def _binary(self, node: fx.Node) -> None:
        out_shape = _shape(node)
        if out_shape is None:
            return self._freeze_inputs(node, [a for a in node.args if a in self.layouts])
        rank = len(out_shape)
        laid = [(i, a) for i, a in enumerate(node.args[:2]) if a in self.layouts]
        # channel axis of the output, aligned from the right as broadcasting does
        axes = {rank - len(_shape(a)) + self.layouts[a].axis for _, a in laid}
        if len(axes) != 1:
            return self._freeze_inputs(node, [a for _, a in laid])
        axis = axes.pop()
        first = self.layouts[laid[0][1]]
        for _, a in laid[1:]:
            other = self.layouts[a]
            if len(other.channels) != len(first.channels):
                return self._freeze_inputs(node, [a for _, a in laid])
            for c1, c2 in zip(first.channels, other.channels):
                self._ties.union(c1, c2)
        for i, a in enumerate(node.args[:2]):
            if a in self.layouts or not isinstance(a, fx.Node):
                continue
            shape = _shape(a) if a.op != "get_attr" else tuple(constant_value(self.gm, a).shape)
            if shape is None:
                return self._freeze_inputs(node, [x for _, x in laid])
            at = axis - (rank - len(shape))
            if at < 0 or shape[at] == 1:
                continue                                     # broadcast along channels
            if a.op == "get_attr":
                self.params.append(ChannelParam(node, i, at, list(first.channels)))
            else:
                return self._freeze_inputs(node, [x for _, x in laid])
        self.layouts[node] = Layout(axis, list(first.channels))

    def _view(self, node: fx.Node, tracked) -> None:
        x = node.args[0]
        in_shape, out_shape = _shape(x), _shape(node)
        if x not in self.layouts or in_shape is None or out_shape is None:
            return self._freeze_inputs(node, tracked)
        layout = self.layouts[x]
        before = _prod(in_shape[:layout.axis])
        after = _prod(in_shape[layout.axis + 1:])
        for k, size in enumerate(out_shape):
            if size == in_shape[layout.axis] and _prod(out_shape[:k]) == before and _prod(out_shape[k + 1:]) == after:
                if node.target in ops.VIEWS and isinstance(node.args[1][k], int) and node.args[1][k] != -1:
                    self.shape_args.append(ShapeArg(node, k))
                self.layouts[node] = Layout(k, list(layout.channels))
                return
        self._freeze(x, f"its channel axis is split or merged by {describe(node)}")

    def _permute(self, node: fx.Node, tracked) -> None:
        x = node.args[0]
        if x not in self.layouts:
            return self._freeze_inputs(node, tracked)
        rank = len(_shape(x))
        order = list(range(rank))
        if node.target is aten.permute.default:
            order = _dims(node.args[1], rank)
        elif node.target is aten.t.default:
            order = order[::-1]
        else:
            a, b = _dims(node.args[1], rank)[0], _dims(node.args[2], rank)[0]
            order[a], order[b] = order[b], order[a]
        self.layouts[node] = Layout(order.index(self.layouts[x].axis), list(self.layouts[x].channels))

    def _reduction(self, node: fx.Node) -> None:
        x = node.args[0]
        layout, rank = self.layouts[x], len(_shape(x))
        dims = _dims(node.args[1], rank) if len(node.args) > 1 and node.args[1] is not None else list(range(rank))
        if layout.axis in dims:
            self._pin(self._needed, layout.channels, f"reduced over channels by {describe(node)}")
            return
        keepdim = (node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False))
        axis = layout.axis if keepdim else layout.axis - sum(d < layout.axis for d in dims)
        self.layouts[node] = Layout(axis, list(layout.channels))

    def _cat(self, node: fx.Node, tracked) -> None:
        parts = node.args[0]
        dim = node.args[1] if len(node.args) > 1 else 0
        rank = len(_shape(node))
        if all(p in self.layouts for p in parts) and len({self.layouts[p].axis for p in parts}) == 1 \
                and self.layouts[parts[0]].axis == dim % rank:
            self.layouts[node] = Layout(dim % rank, [c for p in parts for c in self.layouts[p].channels])
            return
        self._freeze_inputs(node, tracked)

    # -- pins ------------------------------------------------------------------------------
    def _pin(self, table: dict[int, str], channels: list[int], reason: str) -> None:
        for c in channels:
            table.setdefault(c, reason)

    def _freeze(self, node, reason: str) -> None:
        if node in self.layouts:
            self._pin(self._frozen, self.layouts[node].channels, reason)

    def _freeze_inputs(self, node: fx.Node, tracked) -> None:
        for arg in tracked:
            self._freeze(arg, f"read by {describe(node)}, which the channel analysis does not model")

    def _canonical(self, table: dict[int, str]) -> dict[int, str]:
        out: dict[int, str] = {}
        for c, reason in table.items():
            out.setdefault(self.find(c), reason)
        return out

    def _segments(self) -> list[Segment]:
        # channels that share a tensor belong to one segment (concat joins producers' blocks)
        groups = _UnionFind()
        groups.make(len(self._ties.parent))
        for layout in self.layouts.values():
            canon = self.canonical(layout.channels)
            for c in canon[1:]:
                groups.union(canon[0], c)
        by_root: dict[int, Segment] = {}
        self._segment_by_channel: dict[int, Segment] = {}
        for node, layout in self.layouts.items():
            root = groups.find(self.find(layout.channels[0])) if layout.channels else None
            if root is None:
                continue
            seg = by_root.setdefault(root, Segment(len(by_root), []))
            seg.tensors.append(node)
            for c in self.canonical(layout.channels):
                if c not in self._segment_by_channel:
                    self._segment_by_channel[c] = seg
                    seg.channels.append(c)
        for p in self.producers:
            self.segment_of(p.channels[0]).producers.append(p)
        for c in self.consumers:
            self.segment_of(c.channels[0]).consumers.append(c)
        return list(by_root.values())


def _flatten(args) -> list:
    out: list = []
    fx.node.map_aggregate(args, lambda a: out.append(a) if isinstance(a, fx.Node) else None)
    return out


def _prod(xs) -> int:
    p = 1
    for x in xs:
        p *= int(x)
    return p


def input_channel_rms(gm: fx.GraphModule, analysis: ChannelAnalysis, batches) -> dict[fx.Node, torch.Tensor]:
    """Root-mean-square of every consumer input, per channel position, over `batches`
    (tuples of graph inputs): the activation side of an importance such as |W| * ||x||."""
    watched = {c.input for c in analysis.consumers}
    sums: dict[fx.Node, torch.Tensor] = {}
    counts: dict[fx.Node, int] = {}

    class _Observer(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n in watched and isinstance(out, torch.Tensor):
                axis = analysis.layouts[n].axis
                flat = out.detach().double().transpose(0, axis).reshape(out.shape[axis], -1)
                sums[n] = sums.get(n, 0) + flat.pow(2).sum(1)
                counts[n] = counts.get(n, 0) + flat.shape[1]
            return out

    with torch.no_grad():
        for batch in batches:
            _Observer(gm).run(*batch)
    return {n: (sums[n] / counts[n]).sqrt().float() for n in sums}
