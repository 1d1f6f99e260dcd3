"""Horizontal fusion: matmuls that read the same input become one wider matmul.

Rewrites (found by graph pattern, not by module name):
    linear(x, Wa, ba), linear(x, Wb, bb), ...  ->  split(linear(x, [Wa;Wb;...], [ba;bb;...]))
e.g. Llama/Qwen/Mistral gate_proj+up_proj and q/k/v, BERT query/key/value. Weights must be
constants of one dtype and input width; a missing bias becomes zeros when others have one.
Exact up to float rounding.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from ..errors import GraphoptError
from ..ir.graph import add_constant, constant_value, describe, infer_meta, module_path, remove_unused_attributes
from ..ir.lazy import add_concatenation, is_lazy
from ..ir.linear import LINEAR
from ..ir.pattern import match
from .base import Pass, PassResult

aten = torch.ops.aten

@dataclass
class HorizontalFusionOptions:
    min_group: int = 2        # fuse groups of at least this many matmuls
    max_notes: int = 20       # near misses kept in the pass log


class HorizontalFusion(Pass):
    name = "horizontal_fusion"
    Options = HorizontalFusionOptions

    def run(self, gm, ctx):
        groups: dict[fx.Node, list] = {}
        notes: list[str] = []
        for node in gm.graph.find_nodes(op="call_function", target=aten.linear.default):
            m = match(LINEAR, node, gm)
            if not m:
                notes.append(f"not fusable: {m}")
                continue
            if isinstance(m["x"], fx.Node):
                groups.setdefault(m["x"], []).append(m)
        fused_groups, changes = 0, []
        replaced: dict[fx.Node, fx.Node] = {}      # a fused linear's old node -> the part that replaced it
        for x, members in groups.items():
            x = replaced.get(x, x)                  # the input of a later group may be an earlier group's member
            if len(members) < self.options.min_group:
                continue
            by_shape: dict[tuple, list] = {}
            for m in members:
                w = constant_value(gm, m["w"])
                by_shape.setdefault((w.dim(), w.shape[-1], w.dtype), []).append(m)
            if len(by_shape) > 1:
                notes.append(f"input {describe(x)} feeds matmuls of different widths/dtypes: "
                             f"{sorted(str(k) for k in by_shape)}; fused per kind")
            for key, same in by_shape.items():
                if len(same) >= self.options.min_group and key[0] == 2:
                    changes.append(self._fuse(gm, x, same, replaced))
                    fused_groups += 1
        if fused_groups:
            remove_unused_attributes(gm)
        return PassResult(gm, fused_groups > 0, changes, notes[: self.options.max_notes])

    def _fuse(self, gm: fx.GraphModule, x: fx.Node, members: list, replaced: dict) -> str:
        weights = [constant_value(gm, m["w"]) for m in members]
        biases = [constant_value(gm, m.get("b")) if m.get("b") is not None else None for m in members]
        sizes = [w.shape[0] for w in weights]
        paths = [module_path(m.root) or m.root.name for m in members]
        hint = "_fused_" + "_".join(p.split(".")[-1] for p in paths[:4])
        w_name = add_constant(gm, hint + "_weight", torch.cat(weights, 0))
        if is_lazy(gm, weights[0]):            # streamed weights: the fused one is loaded by parts, later
            add_concatenation(gm, w_name, weights, 0)
        b_name = None
        if any(b is not None for b in biases):
            full = [b if b is not None else torch.zeros(w.shape[0], dtype=w.dtype) for b, w in zip(biases, weights)]
            if any(is_lazy(gm, b) for b in full):
                if not all(is_lazy(gm, b) for b in biases):
                    raise GraphoptError(f"{', '.join(paths)}: some biases are streamed from the checkpoint and "
                                        "some are not; their fusion is not supported")
                b_name = add_constant(gm, hint + "_bias", torch.cat(full, 0))
                add_concatenation(gm, b_name, full, 0)
            else:
                b_name = add_constant(gm, hint + "_bias", torch.cat(full, 0))
        first = min((m.root for m in members), key=_position(gm))
        graph = gm.graph
        with graph.inserting_before(first):
            w_node = graph.get_attr(w_name)
            b_node = graph.get_attr(b_name) if b_name else None
            fused = graph.call_function(aten.linear.default, (x, w_node, b_node) if b_node else (x, w_node))
            split = graph.call_function(aten.split_with_sizes.default, (fused, sizes, -1))
            parts = [graph.call_function(operator.getitem, (split, i)) for i in range(len(members))]
        fused.meta.update({k: first.meta[k] for k in ("nn_module_stack", "stack_trace") if k in first.meta})
        for node in (fused, split):
            infer_meta(gm, node)
        for i, (m, part) in enumerate(zip(members, parts)):
            part.meta.update({k: m.root.meta[k] for k in ("nn_module_stack", "stack_trace") if k in m.root.meta})
            part.meta["val"] = split.meta["val"][i]
            m.root.replace_all_uses_with(part)
            replaced[m.root] = part
            graph.erase_node(m.root)
        return f"{' + '.join(paths)} -> one linear [{sum(sizes)}x{weights[0].shape[1]}]"


def _position(gm: fx.GraphModule):
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    return lambda n: order[n]
