"""Capture of MoE models: experts become one moe_experts op; layouts it does not cover raise."""
import pytest
import torch

import graphopt
from graphopt.errors import CaptureError
from graphopt.frontend.moe import experts_as_one_op
from graphopt.frontend.torch_export import capture
from graphopt.ir.moe import MOE_EXPERTS

from ..conftest import assert_close_to_scale, eager_outputs


@pytest.mark.parametrize("name, moe_layers", [("mixtral", 3), ("qwen3_moe", 2), ("deepseek_v3", 2)])
def test_each_experts_module_is_one_op_and_the_graph_equals_eager(name, moe_layers):
    bundle = graphopt.models.load(name)
    inputs = bundle.example_inputs(seq_len=12)
    captured = capture(bundle.model, inputs)
    assert len(captured.graph_module.graph.find_nodes(op="call_function", target=MOE_EXPERTS)) == moe_layers
    assert_close_to_scale(captured(*inputs)[0], eager_outputs(bundle.model, inputs)[0], 1e-6)
    assert not any("forward" in vars(m) for m in bundle.model.modules())     # the swap is undone


def test_an_experts_layout_the_op_does_not_cover_names_the_module():
    bundle = graphopt.models.load("mixtral")
    experts = bundle.model.model.layers[1].mlp.experts
    experts.has_bias = True
    with pytest.raises(CaptureError, match=r"MoE experts 'model.layers.1.mlp.experts' \(MixtralExperts\) use biases"):
        with experts_as_one_op(bundle.model):
            pass
    experts.has_bias = False
    experts.act_fn = torch.nn.Tanh()
    with pytest.raises(CaptureError, match="activation Tanh has no moe_experts equivalent"):
        capture(bundle.model, bundle.example_inputs(seq_len=4))
    assert not any("forward" in vars(m) for m in bundle.model.modules())
