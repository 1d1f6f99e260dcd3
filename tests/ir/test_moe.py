"""graphopt.moe_experts: the reference equals transformers' eager expert loop; the dense form equals it."""
import pytest
import torch

import graphopt
from graphopt.ir.moe import MOE_EXPERTS, dense_moe_experts, routing_matrix

from ..conftest import assert_close_to_scale


def _routing(tokens=7, experts=5, k=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, 16, generator=g)
    index = torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(tokens)])
    weights = torch.rand(tokens, k, generator=g)
    gate_up = torch.randn(experts, 2 * 12, 16, generator=g) * 0.3
    down = torch.randn(experts, 16, 12, generator=g) * 0.3
    return hidden, index, weights, gate_up, down


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe", "deepseek_v3"])
def test_reference_equals_the_models_own_experts(name):
    bundle = graphopt.models.load(name)
    experts = next(m for m in bundle.model.modules() if type(m).__name__.endswith("Experts"))
    hidden, index, weights, _, _ = _routing(tokens=9, experts=experts.num_experts)
    hidden = torch.randn(9, experts.hidden_dim)
    with torch.no_grad():
        want = experts(hidden, index, weights)
        got = MOE_EXPERTS(hidden, index, weights, experts.gate_up_proj, experts.down_proj, "silu")
    assert torch.equal(got, want)


@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh", "relu"])
def test_dense_form_equals_the_reference(activation):
    args = _routing()
    assert_close_to_scale(dense_moe_experts(*args, activation), MOE_EXPERTS(*args, activation), 1e-6)


def test_routing_matrix_puts_each_weight_at_its_expert():
    index = torch.tensor([[2, 0], [1, 3]])
    weights = torch.tensor([[0.75, 0.25], [0.5, 0.125]])
    assert torch.equal(routing_matrix(index, weights, 4),
                       torch.tensor([[0.25, 0.0, 0.75, 0.0], [0.0, 0.5, 0.0, 0.125]]))


def test_experts_without_tokens_are_skipped_and_unknown_activation_raises():
    hidden, index, weights, gate_up, down = _routing(experts=5)
    only_two = torch.tensor([[0, 1], [1, 0]]).repeat(4, 1)[:len(hidden)]      # experts 2..4 get no token
    assert_close_to_scale(MOE_EXPERTS(hidden, only_two, weights, gate_up, down, "silu"),
                          dense_moe_experts(hidden, only_two, weights, gate_up, down, "silu"), 1e-6)
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        MOE_EXPERTS(hidden, index, weights, gate_up, down, "swish")


def test_densify_gives_each_expert_its_own_weights_and_keeps_the_output():
    from graphopt.frontend.torch_export import capture
    from graphopt.ir.moe import densify_experts
    bundle = graphopt.models.load("mixtral")
    inputs = bundle.example_inputs(seq_len=10)
    captured = capture(bundle.model, inputs)
    want = captured(*inputs)[0]
    assert densify_experts(captured.graph_module)
    gm = captured.graph_module
    assert not gm.graph.find_nodes(op="call_function", target=MOE_EXPERTS)
    names = [name for name, _ in gm.named_buffers()]
    assert sum("experts_gate_up_proj_" in n for n in names) == 3 * 4
    assert not any(n.endswith("experts.gate_up_proj") for n, _ in gm.named_parameters())
    assert_close_to_scale(captured(*inputs)[0], want, 1e-6)
