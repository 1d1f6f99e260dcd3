"""Input-adaptive FFN skipping (FFN-SkipLLM) as control flow, for single-token (decode-step)
graphs.

Rewrites, for FFN sublayers of a region [start, end) (FFN numbers, found by graph pattern):
    monitor FFN i:   h' = h + FFN_i(h);  skip = cos(h, h') > threshold
    next `span` FFNs j:  h + FFN_j(h)  ->  h + cond(skip, zeros, FFN_j, h)
then the next FFN monitors again. `cond` is torch.cond, lowered to an ONNX `If`, so a
skipped FFN's matmuls do not run. Attention always runs. The predicate is one token's, so
the graph must have exactly one token (batch 1, sequence 1); the caller runs the full
graph for the first generated tokens (FFN-SkipLLM's warm-up). The quality of a threshold
is measured token by token with `analysis.sublayers.adaptive_ffn_skipping`.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from ..analysis.sublayers import branch_nodes, find_sublayers, node_named
from ..errors import PreconditionError
from ..ir.graph import eliminate_dead_code, remove_unused_attributes
from ..ir.linear import through_views
from .base import Pass, PassResult, Tolerance

aten = torch.ops.aten


def _output_operand(add: fx.Node, writer: fx.Node) -> fx.Node:
    return next(a for a in add.args if isinstance(a, fx.Node) and through_views(a) is writer)


def extract_branch(gm: fx.GraphModule, sub) -> tuple[fx.GraphModule, list[fx.Node], fx.Node]:
    """The sublayer's branch as its own GraphModule taking (stream, *other inputs and weights);
    returns it, the outer nodes to pass as operands, and the node in `gm` it replaces."""
    add, writer, stream = (node_named(gm, n) for n in (sub.add, sub.writer, sub.stream))
    operand = _output_operand(add, writer)
    region = branch_nodes(gm, sub)
    node = operand
    while node is not writer:                       # views between the output linear and the add
        region.add(node)
        node = node.args[0]
    graph = fx.Graph()
    env = {stream: graph.placeholder("stream")}
    outer = [stream]
    for n in gm.graph.nodes:
        if n not in region:
            continue
        for inp in n.all_input_nodes:        # weights too: cond branches take every tensor as an operand
            if inp not in env:
                env[inp] = graph.placeholder(f"in{len(outer)}")
                outer.append(inp)
        env[n] = graph.node_copy(n, lambda a: env[a])
    graph.output((env[operand],))
    return fx.GraphModule(torch.nn.Module(), graph), outer, operand


def _zeros_like_first(count: int) -> fx.GraphModule:
    graph = fx.Graph()
    inputs = [graph.placeholder(f"x{i}") for i in range(count)]
    graph.output((graph.call_function(aten.zeros_like.default, (inputs[0],)),))
    return fx.GraphModule(torch.nn.Module(), graph)


@dataclass
class AdaptiveFFNSkippingOptions:
    threshold: float = 0.97
    region: tuple[int, int] | None = None     # FFN numbers [start, end); default the middle half
    span: int = 1                             # FFNs skipped after a saturated monitor


class AdaptiveFFNSkipping(Pass):
    name = "adaptive_ffn_skipping"
    Options = AdaptiveFFNSkippingOptions
    tolerance = Tolerance(rtol=math.inf)       # input dependent; measured by adaptive_ffn_skipping()

    def requires(self, gm, ctx):
        shapes = [n.meta["val"].shape for n in gm.graph.nodes
                  if n.op == "placeholder" and isinstance(n.meta.get("val"), torch.Tensor)]
        if not shapes or math.prod(shapes[0]) != 1:
            raise PreconditionError(
                f"adaptive FFN skipping decides per token: the graph must take one token "
                f"(input shape {list(shapes[0]) if shapes else '?'}); compile a KV-cache decode step, "
                f"graphopt.frontend.decode.DecodeStep(model), with input_ids of shape [1, 1]"
            )

    def run(self, gm, ctx):
        o = self.options
        ffns = [s for s in find_sublayers(gm) if s.kind == "ffn"]
        start, end = o.region if o.region is not None else (len(ffns) // 4, len(ffns) - len(ffns) // 4)
        graph, changes, k = gm.graph, [], start
        while k < end - 1:
            monitor = ffns[k]
            add, stream = node_named(gm, monitor.add), node_named(gm, monitor.stream)
            targets = ffns[k + 1:min(k + 1 + o.span, end)]
            with graph.inserting_before(add.next):
                cos = graph.call_function(aten.cosine_similarity.default, (stream, add, -1))
                cos.meta["val"] = add.meta["val"].new_empty(add.meta["val"].shape[:-1])
                gt = graph.call_function(aten.gt.Scalar, (cos, o.threshold))
                gt.meta["val"] = cos.meta["val"].to(torch.bool)
                pred = graph.call_function(aten.view.default, (gt, []))
                pred.meta["val"] = gt.meta["val"].reshape([])
            for target in targets:
                branch, outer, operand = extract_branch(gm, target)
                j_add = node_named(gm, target.add)
                base = f"_ffn_skip_{target.index}"
                gm.add_submodule(base + "_run", branch)
                gm.add_submodule(base + "_skip", _zeros_like_first(len(outer)))
                with graph.inserting_before(j_add):
                    skip_fn, run_fn = graph.get_attr(base + "_skip"), graph.get_attr(base + "_run")
                    cond = graph.call_function(torch.ops.higher_order.cond, (pred, skip_fn, run_fn, tuple(outer)))
                    cond.meta["val"] = (operand.meta["val"],)
                    out = graph.call_function(operator.getitem, (cond, 0))
                    out.meta["val"] = operand.meta["val"]
                j_add.replace_input_with(operand, out)
                changes.append(f"{target.name} runs only when {monitor.name} leaves cos <= {o.threshold}")
            k += 1 + o.span
        eliminate_dead_code(gm)
        remove_unused_attributes(gm)
        return PassResult(gm, bool(changes), changes)
