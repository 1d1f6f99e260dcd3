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


@torch.library.custom_op("graphopt::moe_experts_nbits", mutates_args=())
def moe_experts_nbits(hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                      gate_up: list[torch.Tensor], down: list[torch.Tensor], bits: int, gate_up_block_size: int,
                      down_block_size: int, activation: str, accuracy_level: int) -> torch.Tensor:
    """moe_experts with block-quantized expert weights. `gate_up` and `down` are each
    [packed, scales, zero_points, minimums] with a leading expert dim: packed
    [E, N, n_blocks, blob], scales [E, N * n_blocks], zero_points [E, bytes] (or [E, 0]: every
    zero point 2**(bits-1)), minimums [E, N, n_blocks] for the "offset" grid (or [E, 0, 0]),
    in graphopt.ir.quantized's layout for each expert, blocks of gate_up_block_size and
    down_block_size along each matrix's rows. `accuracy_level` is a lowering hint
    (ONNX Runtime's MatMulNBits)."""
    hidden_size, intermediate = hidden.shape[-1], gate_up[0].shape[1] // 2
    return moe_experts(hidden, top_k_index, top_k_weights,
                       dequantize_experts(gate_up, bits, gate_up_block_size, hidden_size),
                       dequantize_experts(down, bits, down_block_size, intermediate), activation)


@moe_experts_nbits.register_fake
def _moe_experts_nbits_fake(hidden, top_k_index, top_k_weights, gate_up, down, bits, gate_up_block_size,
                            down_block_size, activation, accuracy_level):
    return torch.empty_like(hidden)


MOE_EXPERTS_NBITS = torch.ops.graphopt.moe_experts_nbits.default
MOE_OPS = frozenset({MOE_EXPERTS, MOE_EXPERTS_NBITS})


def dequantize_experts(parts: list[torch.Tensor], bits: int, block_size: int, k: int) -> torch.Tensor:
    """[E, N, k] float32 from moe_experts_nbits's [packed, scales, zero_points, minimums]."""
    from .quantized import QuantizedWeight
    packed, scales, zero_points, minimums = parts
    return torch.stack([QuantizedWeight(packed[e], scales[e], zero_points[e], bits, block_size, k,
                                        minimums[e] if minimums.numel() else None).dequantize()
                        for e in range(packed.shape[0])])


def stack_quantized(weights: list) -> list[torch.Tensor]:
    """Per-expert QuantizedWeights (one scheme) -> moe_experts_nbits's stacked parts."""
    experts = len(weights)
    minimums = [w.minimums for w in weights]
    return [torch.stack([w.packed for w in weights]), torch.stack([w.scales for w in weights]),
            torch.stack([w.zero_points for w in weights]) if weights[0].zero_points.numel()
            else torch.zeros(experts, 0, dtype=torch.uint8),
            torch.stack(minimums) if minimums[0] is not None
            else torch.zeros(experts, 0, 0, dtype=weights[0].scales.dtype)]


def routing_walk(gm: torch.fx.GraphModule, node: torch.fx.Node) -> tuple[list, list]:
    """(router linears, every other node) met walking back from an MoE node's top-k index and
    weight inputs, stopping at linear layers and at the node's hidden input."""
    from .linear import linear_weight
    stack, seen, linears, others = [a for a in node.args[1:3] if isinstance(a, torch.fx.Node)], set(), [], []
    while stack:
        current = stack.pop()
        if current in seen or current is node.args[0]:
            continue
        seen.add(current)
        if current.op == "call_function" and linear_weight(gm, current) is not None:
            linears.append(current)
            continue
        others.append(current)
        stack.extend(current.all_input_nodes)
    return linears, others


def router_linears(gm: torch.fx.GraphModule) -> set:
    """The linear nodes that compute MoE routing (quantization keeps them in fp32)."""
    return {linear for node in gm.graph.nodes if node.op == "call_function" and node.target in MOE_OPS
            for linear in routing_walk(gm, node)[0]}
