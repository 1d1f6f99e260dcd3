"""MoE models (Mixtral, Qwen3-MoE, DeepSeek-V3 configs) on both backends, static and dynamic lengths."""
import pytest
import torch

import graphopt
from graphopt.frontend.torch_export import sequence_dims
from graphopt.ir.moe import MOE_EXPERTS

from ..conftest import assert_close_to_scale, eager_outputs

MOE_FAMILIES = ["mixtral", "qwen3_moe", "deepseek_v3"]


@pytest.mark.parametrize("name", MOE_FAMILIES)
def test_onnxruntime_matches_eager_at_static_and_dynamic_lengths(name):
    bundle = graphopt.models.load(name)
    inputs = bundle.example_inputs(seq_len=16)
    static = graphopt.compile(bundle.model, inputs, progress=False)
    assert_close_to_scale(static(*inputs), eager_outputs(bundle.model, inputs)[0], 1e-4)
    dynamic = graphopt.compile(bundle.model, inputs, dynamic_dims=sequence_dims(inputs), progress=False)
    for seq in (1, 9, 40):
        other = bundle.example_inputs(seq_len=seq, seed=seq)
        assert_close_to_scale(dynamic(*other), eager_outputs(bundle.model, other)[0], 1e-4)


@pytest.mark.parametrize("name", MOE_FAMILIES)
def test_tvm_matches_eager(name):
    pytest.importorskip("tvm")
    bundle = graphopt.models.load(name)
    inputs = bundle.example_inputs(seq_len=16)
    cm = graphopt.compile(bundle.model, inputs, backend="tvm", progress=False)
    assert_close_to_scale(cm(*inputs), eager_outputs(bundle.model, inputs)[0], 1e-4)


class _Experts(torch.nn.Module):
    def __init__(self, activation: str, experts: int = 5):
        super().__init__()
        self.activation = activation
        self.gate_up = torch.nn.Parameter(torch.randn(experts, 24, 16) * 0.3)
        self.down = torch.nn.Parameter(torch.randn(experts, 16, 12) * 0.3)

    def forward(self, hidden, index, weights):
        return MOE_EXPERTS(hidden, index, weights, self.gate_up, self.down, self.activation)


@pytest.mark.parametrize("backend", ["onnxruntime", "tvm"])
@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh", "relu"])
def test_each_activation_lowers_exactly(activation, backend):
    if backend == "tvm":
        pytest.importorskip("tvm")
    torch.manual_seed(0)
    model = _Experts(activation)
    hidden = torch.randn(7, 16)
    index = torch.stack([torch.randperm(5)[:2] for _ in range(7)])
    weights = torch.rand(7, 2)
    cm = graphopt.compile(model, (hidden, index, weights), passes="none", backend=backend, progress=False)
    with torch.no_grad():
        assert_close_to_scale(cm(hidden, index, weights), model(hidden, index, weights), 1e-5)
