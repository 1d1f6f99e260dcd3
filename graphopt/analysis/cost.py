"""What a graph costs, node by node: multiply-accumulates (MACs) and weight bytes.

Read-only. MACs count the ops that dominate CPU time in the models graphopt targets: convolutions,
linear layers (linear, addmm, mm, bmm, matmul, graphopt's quantized matmul_nbits), mixture-of-
experts blocks (the routed tokens' expert matmuls) and scaled-dot-product attention, from the
shapes in `node.meta["val"]`. Everything else (elementwise ops, norms, pools) counts as zero
MACs. A pruning pass uses `node_macs` to hold a compute budget; a report can rank nodes by it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.fx as fx

from ..ir import ops
from ..ir.graph import constant_value, parameter_bytes
from ..ir.moe import MOE_EXPERTS, MOE_OPS

aten = torch.ops.aten



def _matmul_nbits():
    from ..ir import quantized  # noqa: F401  (registers graphopt::matmul_nbits, whose MACs are a matmul's)
    return torch.ops.graphopt.matmul_nbits.default


def node_macs(node: fx.Node, gm: fx.GraphModule | None = None) -> int:
    """Multiply-accumulates of one call of `node` at its traced shapes (0 for ops not counted).
    Constants without shape metadata (a pass's new weights) are read from `gm`."""
    def _shape(value) -> tuple[int, ...] | None:
        if isinstance(value, fx.Node):
            value = value.meta.get("val", constant_value(gm, value) if gm is not None else None)
        return tuple(int(d) for d in value.shape) if isinstance(value, torch.Tensor) else None

    if node.op != "call_function":
        return 0
    out = _shape(node)
    if out is None:
        return 0
    target = node.target
    if target in ops.CONVOLUTIONS:
        weight = _shape(node.args[1])                # [C_out, C_in / groups, *kernel]
        transposed = target is aten.convolution.default and bool(node.args[6])
        if weight is None:
            return 0
        if transposed:                               # [C_in, C_out / groups, *kernel]: every input pixel
            return math.prod(_shape(node.args[0])) * math.prod(weight[1:])
        return math.prod(out) * math.prod(weight[1:])
    if target in ops.MATMULS or target is _matmul_nbits():
        x = node.args[1] if target is aten.addmm.default else node.args[0]
        xs = _shape(x)
        return math.prod(out) * xs[-1] if xs else 0
    if target in MOE_OPS:                            # each token through its top-k experts: 3 H x I products
        hidden, index = _shape(node.args[0]), _shape(node.args[1])
        if hidden is None or index is None:
            return 0
        intermediate = (_shape(node.args[3]) if target is MOE_EXPERTS else _shape(node.args[3][0]))[1] // 2
        return math.prod(index) * 3 * hidden[-1] * intermediate
    if target is aten.scaled_dot_product_attention.default:
        q, k, v = (_shape(a) for a in node.args[:3])
        if q is None or k is None or v is None:
            return 0
        return math.prod(q[:-1]) * k[-2] * (q[-1] + v[-1])
    return 0


@dataclass
class GraphCost:
    macs: int
    weight_bytes: int
    per_node: dict[str, int]       # node name -> MACs, for the nodes that have any


def graph_cost(gm: fx.GraphModule) -> GraphCost:
    """Total MACs, the bytes of the graph's parameters and buffers (each tensor once), and MACs per node."""
    per_node = {n.name: m for n in gm.graph.nodes if (m := node_macs(n, gm))}
    return GraphCost(sum(per_node.values()), parameter_bytes(gm), per_node)
