"""Expert pruning: drop the experts a mixture-of-experts layer routes least to.

Rewrites, per moe_experts node (graphopt.ir.moe), with E' < E experts kept:
    router linear  W [E, H] (b [E])     ->  W[kept] (b[kept])
    moe_experts(x, index, weights, gate_up [E, ...], down [E, ...])
                                        ->  moe_experts(x, index, weights, gate_up[kept], down[kept])
so the router scores only the kept experts and its softmax (or sigmoid and top-k
renormalisation) spreads each token's weight over them: index e now means kept[e].

Routing frequency is measured by running the graph on the calibration batches (or the
example inputs) and counting, per layer, how many (token, slot) routings each expert got;
each layer keeps the `keep` share of its experts (at least its top-k), most-routed first.
Only routers whose scores reach top-k through ops that do not depend on the expert count
(linear -> softmax or sigmoid -> top-k -> sums and scalings of the top-k) are pruned; a
router with a score bias, group routing (DeepSeek-V3's view by expert groups) or any other
op is left whole and named in the notes. Lossy: the quality instrument measures the cost.
Run it before weight quantization (it prunes fp32 experts only).
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from ..errors import PreconditionError
from ..ir.graph import add_constant, constant_value, infer_meta, remove_unused_attributes
from ..ir.linear import layer_name
from ..ir.moe import MOE_EXPERTS, MOE_EXPERTS_NBITS, routing_walk
from .base import Pass, PassResult, Tolerance, option

aten = torch.ops.aten

# Ops a router may apply between its linear and the top-k outputs without depending on E.
_EXPERT_COUNT_FREE = {aten.softmax.int, aten._softmax.default, aten.sigmoid.default, aten.topk.default,
                      aten._to_copy.default, aten.sum.dim_IntList, aten.div.Tensor, aten.mul.Tensor, aten.mul.Scalar,
                      aten.add.Scalar, aten.clone.default, aten.alias.default, aten.detach.default}


@dataclass
class ExpertPruningOptions:
    keep: float = option(0.75, "share of each MoE layer's experts kept (rounded up, at least the layer's top-k)",
                         at_least=0.0)
    batches: int = option(8, "calibration batches the routing counts come from (the first ones)", at_least=1)


class ExpertPruning(Pass):
    """Drop each MoE layer's least-routed experts; see the module docstring."""

    name = "expert_pruning"
    Options = ExpertPruningOptions
    tolerance = Tolerance(rtol=float("inf"))     # lossy; its cost is measured by the quality instrument

    def __init__(self, options=None, **overrides):
        super().__init__(options, **overrides)
        if self.options.keep > 1.0:
            raise PreconditionError(f"{self.name}: keep is a share of the experts (0..1], got {self.options.keep}")
        self.routing_counts: dict[str, list[int]] = {}     # experts module -> routings per expert
        self.kept: dict[str, list[int]] = {}               # experts module -> the experts kept

    def requires(self, gm, ctx):
        if gm.graph.find_nodes(op="call_function", target=MOE_EXPERTS_NBITS):
            raise PreconditionError(f"{self.name}: the experts are quantized already; run expert_pruning before "
                                    "weight_quantization")

    def run(self, gm, ctx):
        nodes = list(gm.graph.find_nodes(op="call_function", target=MOE_EXPERTS))
        if not nodes:
            return PassResult(gm, False, [], ["no MoE experts in the graph"])
        batches = (ctx.calibration or ([tuple(ctx.example_inputs)] if ctx.example_inputs is not None else []))
        if not batches:
            raise PreconditionError(f"{self.name} counts routings on calibration batches or the example inputs; "
                                    "it got neither")
        counts = routing_counts(gm, batches[:self.options.batches], nodes)
        changes, notes = [], []
        for node in nodes:
            name = layer_name(node)
            experts = constant_value(gm, node.args[3]).shape[0]
            self.routing_counts[name] = counts[node].tolist()
            router, top_k, reason = _prunable_router(gm, node)
            if router is None:
                notes.append(f"{name}: kept whole ({reason})")
                continue
            keep = min(experts, max(top_k, math.ceil(self.options.keep * experts)))
            if keep == experts:
                continue
            order = sorted(range(experts), key=lambda e: (-int(counts[node][e]), e))
            kept = sorted(order[:keep])
            self.kept[name] = kept
            index = torch.tensor(kept, dtype=torch.long)
            _select_rows(gm, router, 1, index)
            if len(router.args) > 2 and router.args[2] is not None:
                _select_rows(gm, router, 2, index)
            _select_rows(gm, node, 3, index)
            _select_rows(gm, node, 4, index)
            total = max(int(counts[node].sum()), 1)
            dropped = [e for e in range(experts) if e not in kept]
            shares = ", ".join(f"{e}: {100 * int(counts[node][e]) / total:.1f}%" for e in dropped)
            changes.append(f"{name}: kept {keep} of {experts} experts; dropped {dropped} "
                           f"(share of routings {shares}); router {layer_name(router)} scores the kept ones")
        if changes:
            for node in gm.graph.nodes:
                if node.op == "call_function":
                    infer_meta(gm, node)
            remove_unused_attributes(gm)
        return PassResult(gm, bool(changes), changes, notes)


def routing_counts(gm: fx.GraphModule, batches, nodes) -> dict[fx.Node, torch.Tensor]:
    """moe_experts node -> routings per expert (token-slot pairs) over `batches`."""
    counts = {node: torch.zeros(constant_value(gm, node.args[3]).shape[0], dtype=torch.long) for node in nodes}

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n in counts:
                index = self.env[n.args[1]]
                counts[n] += torch.bincount(index.reshape(-1), minlength=len(counts[n]))[:len(counts[n])]
            return out

    with torch.no_grad():
        for batch in batches:
            Recorder(gm).run(*batch)
    return counts


def _prunable_router(gm: fx.GraphModule, node: fx.Node) -> tuple[fx.Node | None, int, str]:
    """(the router linear, top-k, "") if every op from it to the top-k inputs is free of the
    expert count, else (None, 0, why not)."""
    routers, others = routing_walk(gm, node)
    top_k = 0
    for current in others:
        what = getattr(current.target, "__name__", current.target)
        if current.op != "call_function":
            return None, 0, f"its routing reads {current.op} '{current.target}'"
        if current.target is not operator.getitem and current.target not in _EXPERT_COUNT_FREE:
            return None, 0, f"its router applies {what}"
        if any(constant_value(gm, arg) is not None for arg in current.all_input_nodes):
            return None, 0, f"its router's {what} reads a constant"
        if current.target is aten.topk.default:
            top_k = int(current.args[1])
    if len(routers) != 1 or not top_k:
        return None, 0, "no single router linear and top-k found"
    if routers[0].target is not aten.linear.default:
        return None, 0, f"its router is {routers[0].target}, not a linear layer"
    return routers[0], top_k, ""


def _select_rows(gm: fx.GraphModule, node: fx.Node, arg: int, index: torch.Tensor) -> None:
    old = node.args[arg]
    value = constant_value(gm, old).index_select(0, index)
    with gm.graph.inserting_before(node):
        node.update_arg(arg, gm.graph.get_attr(add_constant(gm, f"{old.target}_kept", value)))
    if not old.users:
        gm.graph.erase_node(old)
