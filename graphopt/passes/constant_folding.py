"""Constant folding: evaluate at compile time whatever does not depend on the inputs' values.

Rewrites:
    op(constant, ..., constant)        -> constant      (pure, deterministic ops only)
    op()  e.g. arange(128)             -> constant      (static shapes)
    new_ones(x) / zeros_like(x) / ...  -> constant      (reads only x's static shape)
A folded result much larger than the stored constants it was computed from (an expand, a
rotary table computed from its frequencies) is not stored; its inputs are folded instead, so
the artifact does not grow.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from ..ir import ops
from ..ir.graph import add_constant, eliminate_dead_code, fetch_attr, remove_unused_attributes
from .base import Pass, PassResult

aten = torch.ops.aten



def _is_static(node: fx.Node) -> bool:
    val = node.meta.get("val")
    return isinstance(val, torch.Tensor) and all(isinstance(d, int) for d in val.shape)


def _deterministic(target) -> bool:
    tags = getattr(target, "tags", ())
    return torch.Tag.nondeterministic_seeded not in tags and torch.Tag.dynamic_output_shape not in tags


@dataclass
class ConstantFoldingOptions:
    # A folded tensor may be at most this many times larger than the stored constants its
    # subgraph reads (and at least max_growth_floor elements are always allowed).
    max_growth: float = 4.0
    max_growth_floor: int = 1 << 16


class ConstantFolding(Pass):
    name = "constant_folding"
    Options = ConstantFoldingOptions

    def run(self, gm, ctx):
        values: dict[fx.Node, object] = {}
        for node in gm.graph.nodes:
            if node.op == "get_attr":
                value = fetch_attr(gm, node.target)
                if isinstance(value, torch.Tensor):
                    values[node] = value
            elif node.op == "call_function" and self._foldable(node, values):
                args = fx.node.map_arg(node.args, lambda n: values[n] if n in values else _fake_for_shape(n))
                kwargs = fx.node.map_arg(node.kwargs, lambda n: values[n])
                with torch.no_grad():
                    values[node] = node.target(*args, **kwargs)
        frontier = [n for n in values if n.op == "call_function"
                    and any(u not in values for u in n.users)]
        folded: list[fx.Node] = []
        for node in frontier:
            self._materialize(gm, node, values, folded)
        if not folded:
            return PassResult(gm, False)
        eliminate_dead_code(gm)
        remove_unused_attributes(gm)
        kb = sum(values[n].numel() * values[n].element_size() for n in folded) / 1e3
        return PassResult(gm, True, [f"folded {len(folded)} subgraph outputs into constants ({kb:.1f} KB)"])

    def _foldable(self, node: fx.Node, values) -> bool:
        if node.is_impure() or not _deterministic(node.target):
            return False
        inputs = node.all_input_nodes
        if node.target is operator.getitem:
            return inputs[0] in values
        if not isinstance(node.meta.get("val"), torch.Tensor) or not _is_static(node):
            return False
        if node.target in ops.SHAPE_ONLY:
            return all(n in values or (i == 0 and _is_static(n)) for i, n in enumerate(inputs))
        return all(n in values for n in inputs)

    def _source_numel(self, node: fx.Node, values) -> int:
        """Elements of the stored constants (get_attr) that `node`'s folded subgraph reads."""
        seen, stack, total = set(), [node], 0
        while stack:
            current = stack.pop()
            for src in current.all_input_nodes:
                if src in seen or src not in values:
                    continue
                seen.add(src)
                if src.op == "get_attr":
                    total += values[src].numel() if isinstance(values[src], torch.Tensor) else 0
                else:
                    stack.append(src)
        return total

    def _materialize(self, gm, node: fx.Node, values, folded: list) -> None:
        value = values[node]
        if not isinstance(value, torch.Tensor):
            return
        limit = max(self.options.max_growth_floor, self.options.max_growth * self._source_numel(node, values))
        if value.numel() > limit:
            for src in node.all_input_nodes:
                if src in values and src.op == "call_function":
                    self._materialize(gm, src, values, folded)
            return
        name = add_constant(gm, f"_folded_{node.name}", value)
        with gm.graph.inserting_before(node):
            const = gm.graph.get_attr(name)
        const.meta.update(
            {k: v for k, v in node.meta.items() if k in ("val", "tensor_meta", "nn_module_stack", "stack_trace")}
        )
        node.replace_all_uses_with(const)
        folded.append(node)


def _fake_for_shape(node: fx.Node) -> torch.Tensor:
    """A stand-in with the static shape and dtype of `node`, for shape-only ops."""
    val = node.meta["val"]
    return torch.zeros(tuple(val.shape), dtype=val.dtype)
