"""Mixture-of-experts feed-forward as one graphopt op: what an MoE block's experts become in the IR.

    out = torch.ops.graphopt.moe_experts(hidden, top_k_index, top_k_weights, gate_up, down, activation)

hidden [T, H] are the tokens, top_k_index [T, k] (int64) the experts each token is routed to
(distinct within a row) and top_k_weights [T, k] their weights, as the model's router made
them (softmax or sigmoid, group routing, renormalisation and scaling all stay ordinary ops
before this one). gate_up [E, 2I, H] holds each expert's gate and up projections stacked (gate
first), down [E, H, I] its down projection: Hugging Face's fused expert layout. Then

    out[t] = sum_j top_k_weights[t, j] * expert(top_k_index[t, j], hidden[t])
    expert(e, x) = down[e] @ (act(gate_up[e][:I] @ x) * (gate_up[e][I:] @ x))

accumulated expert by expert in ascending order, as transformers' eager loop does. The
implementation here is the reference; the backends lower the op sparsely (each expert runs on
the tokens routed to it) or densely (every expert on every token, weighted by a [T, E] routing
matrix that is zero off the top-k): `dense_moe_experts` is that dense form in ATen ops, and
`densify_experts` rewrites a graph's experts into it (each expert's weights a 2-D constant of
its own, so backends pack them like any linear layer's).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


def _check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"moe_experts: unknown activation '{activation}' (known: {', '.join(ACTIVATIONS)})")


@torch.library.custom_op("graphopt::moe_experts", mutates_args=())
def moe_experts(hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                gate_up: torch.Tensor, down: torch.Tensor, activation: str) -> torch.Tensor:
    _check_activation(activation)
    act = ACTIVATIONS[activation]
    out = torch.zeros_like(hidden)
    intermediate = down.shape[2]
    for expert in range(gate_up.shape[0]):
        token, slot = torch.where(top_k_index == expert)
        if token.numel() == 0:
            continue
        projected = F.linear(hidden[token], gate_up[expert])
        gated = act(projected[:, :intermediate]) * projected[:, intermediate:]
        y = F.linear(gated, down[expert]) * top_k_weights[token, slot, None]
        out.index_add_(0, token, y.to(out.dtype))
    return out


@moe_experts.register_fake
def _moe_experts_fake(hidden, top_k_index, top_k_weights, gate_up, down, activation):
    return torch.empty_like(hidden)


MOE_EXPERTS = torch.ops.graphopt.moe_experts.default


def routing_matrix(top_k_index: torch.Tensor, top_k_weights: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[T, E]: each token's weight for each expert, zero where it is not routed."""
    experts = torch.arange(num_experts, device=top_k_index.device)
    hits = (top_k_index.unsqueeze(-1) == experts).to(top_k_weights.dtype)          # [T, k, E]
    return (top_k_weights.unsqueeze(-1) * hits).sum(1)


def dense_moe_experts(hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                      gate_up: torch.Tensor, down: torch.Tensor, activation: str) -> torch.Tensor:
    """moe_experts evaluated densely: every expert on every token, in batched matmuls with
    static shapes (E/k times the arithmetic of the sparse form, no data-dependent shapes)."""
    _check_activation(activation)
    intermediate = down.shape[2]
    projected = torch.matmul(hidden.unsqueeze(0), gate_up.transpose(1, 2))          # [E, T, 2I]
    gated = ACTIVATIONS[activation](projected[..., :intermediate]) * projected[..., intermediate:]
    per_expert = torch.matmul(gated, down.transpose(1, 2))                           # [E, T, H]
    routing = routing_matrix(top_k_index, top_k_weights, gate_up.shape[0])          # [T, E]
    return (per_expert * routing.t().unsqueeze(-1).to(per_expert.dtype)).sum(0).to(hidden.dtype)


def dense_moe_experts_unstacked(hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                                activation: str, *weights: torch.Tensor) -> torch.Tensor:
    """dense_moe_experts with each expert's weights a separate 2-D tensor (`weights` = the E
    gate_up matrices, then the E down matrices): one plain matmul per weight, which a backend
    packs like any linear layer's (TVM's batched matmul over stacked weights is not)."""
    _check_activation(activation)
    experts = len(weights) // 2
    act = ACTIVATIONS[activation]
    routing = routing_matrix(top_k_index, top_k_weights, experts)
    out = torch.zeros_like(hidden)
    for expert, (gate_up, down) in enumerate(zip(weights[:experts], weights[experts:])):
        intermediate = down.shape[1]
        projected = F.linear(hidden, gate_up)
        y = F.linear(act(projected[..., :intermediate]) * projected[..., intermediate:], down)
        out = out + y * routing[:, expert:expert + 1].to(y.dtype)
    return out


def densify_experts(gm: torch.fx.GraphModule) -> bool:
    """Replace every moe_experts node of `gm` by its dense form, a call of a Python function
    that a re-export traces into ATen ops: dense_moe_experts_unstacked when the expert weights
    are constants (each expert's matrices become constants of their own), else
    dense_moe_experts. True if any changed."""
    from .graph import add_constant, constant_value, eliminate_dead_code, remove_unused_attributes
    changed = False
    for node in gm.graph.find_nodes(op="call_function", target=MOE_EXPERTS):
        hidden, index, weights, gate_up, down, activation = node.args
        stacked = [constant_value(gm, gate_up), constant_value(gm, down)]
        changed = True
        if any(value is None for value in stacked):
            node.target = dense_moe_experts
            continue
        with gm.graph.inserting_before(node):
            per_expert = [gm.graph.get_attr(add_constant(gm, f"{source.target}_{expert}", value[expert].clone()))
                          for source, value in zip((gate_up, down), stacked) for expert in range(value.shape[0])]
        node.target = dense_moe_experts_unstacked
        node.args = (hidden, index, weights, activation, *per_expert)
    if changed:
        eliminate_dead_code(gm)
        remove_unused_attributes(gm)
        gm.recompile()
    return changed
