"""Linear layers: x @ W with W a constant matrix, in whichever ATen form capture produced it
(linear(x, W, b), matmul / mm(x, W^T), addmm(b, x, W^T) as GPT-2's Conv1D). Passes and
analyses recognize, read and rewrite linear layers through these functions only.

    w, transposed = linear_weight(gm, node)         # None if node is not a linear layer
    x, b = linear_input(node), linear_bias(node)
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ..errors import GraphoptError
from . import ops
from .graph import add_constant, constant_value, describe, module_path
from .pattern import Constant, Input, Op, Optional

aten = torch.ops.aten
_VIEWS_OR_CLONES = ops.VIEWS | {aten.clone.default}

# The aten.linear form with a constant weight, as a pattern (horizontal fusion matches it).
LINEAR = Op(aten.linear.default, Input("x"), Constant("w"), Optional(Constant("b")))


def linear_weight(gm: fx.GraphModule, node: fx.Node) -> tuple[torch.Tensor, bool] | None:
    """(weight as [out, in], whether it is stored transposed) if `node` multiplies its input
    by a constant 2-D matrix: linear(x, W), matmul/mm(x, W), addmm(b, x, W) (GPT-2's Conv1D)."""
    if node.op != "call_function" or node.target not in ops.LINEARS or len(node.args) < 2:
        return None
    if node.target is aten.addmm.default and (len(node.args) != 3 or node.kwargs):
        return None                     # beta/alpha other than 1
    w = constant_value(gm, node.args[2] if node.target is aten.addmm.default else node.args[1])
    if w is None or w.dim() != 2 or not w.is_floating_point():
        return None
    if node.target is aten.linear.default:
        return w, False
    return w.t(), True


def linear_input(node: fx.Node) -> fx.Node:
    return node.args[1] if node.target is aten.addmm.default else node.args[0]


def linear_bias(node: fx.Node):
    if node.target is aten.addmm.default:
        return node.args[0]
    if node.target is aten.linear.default and len(node.args) > 2:
        return node.args[2]
    return None


def layer_name(node: fx.Node) -> str:
    return module_path(node) or node.name


def through_views(node: fx.Node) -> fx.Node:
    while node.op == "call_function" and node.target in _VIEWS_OR_CLONES and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node



def set_linear_weight(gm: fx.GraphModule, node: fx.Node, weight: torch.Tensor, bias, transposed: bool,
                      hint: str) -> None:
    """Give linear layer `node` a new [out, in] `weight` (stored transposed if `transposed`, as
    linear_weight reported) and bias, as new constants named after `hint`."""
    graph = gm.graph
    with graph.inserting_before(node):
        w_node = graph.get_attr(add_constant(gm, hint + "_weight", weight.t() if transposed else weight))
        b_node = graph.get_attr(add_constant(gm, hint + "_bias", bias)) if bias is not None else None
    if node.target is aten.addmm.default:
        node.args = (b_node, node.args[1], w_node)
    elif node.target is aten.linear.default:
        node.args = (node.args[0], w_node, b_node) if b_node is not None else (node.args[0], w_node)
    else:                                        # matmul / mm: x @ W^T, bias added elsewhere
        if bias is not None:
            raise GraphoptError(f"{describe(node)}: bias folding into {node.target} is not supported")
        node.args = (node.args[0], w_node)
