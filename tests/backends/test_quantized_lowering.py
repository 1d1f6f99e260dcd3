"""Quantized weights lowered to ONNX Runtime (MatMulNBits, Gather + dequantize): the same
numbers as graphopt's torch reference ops, smaller artifacts, torch-free loading."""
import os

import numpy as np
import onnx
import pytest
import torch

import graphopt
from graphopt.ir.quantized import quantize_weight
from graphopt.passes import ConstantFolding, DeadCodeElimination, WeightQuantization

from ..conftest import assert_close_to_scale, run_artifact_without_torch, small_inputs


class _QuantizedLookupAndProject(torch.nn.Module):
    def __init__(self, bits, block):
        super().__init__()
        torch.manual_seed(0)
        self.bits = bits
        for prefix, shape in (("table", (50, 96)), ("proj", (40, 96))):
            q = quantize_weight(torch.randn(*shape), bits, block)
            for part in ("packed", "scales", "zero_points"):
                self.register_buffer(f"{prefix}_{part}", getattr(q, part))
            self.block = q.block_size

    def forward(self, ids):
        e = torch.ops.graphopt.embedding_nbits(ids, self.table_packed, self.table_scales, self.table_zero_points,
                                               self.bits, self.block, 96)
        return torch.ops.graphopt.matmul_nbits(e, self.proj_packed, self.proj_scales, self.proj_zero_points,
                                               self.bits, self.block, 96, 0)


@pytest.mark.parametrize("bits,block", [(4, 32), (4, 64), (8, None), (8, 16)])
def test_ops_lower_to_matmul_nbits_and_match_the_reference(bits, block):
    model = _QuantizedLookupAndProject(bits, block)
    ids = torch.tensor([[1, 5, 49, 0, 7]])
    cm = graphopt.compile(model, (ids,), passes="none", progress=False)
    assert_close_to_scale(cm(ids), model(ids), 1e-5)
    ops = [
        n.op_type
        for n in onnx.load(os.path.join(cm.executable.workdir, "model.onnx"), load_external_data=False).graph.node
    ]
    assert "MatMulNBits" in ops and "Gather" in ops


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_quantized_model_on_onnxruntime_matches_its_ir(name):
    bundle = graphopt.models.load(name)
    inputs = small_inputs(bundle)
    passes = [ConstantFolding(), WeightQuantization(bits=4, group_size=32, accuracy_level=0), DeadCodeElimination()]
    cm = graphopt.compile(bundle.model, inputs, passes=passes, progress=False)
    with torch.no_grad():
        reference = cm.graph_module(*inputs)[0]
    assert_close_to_scale(cm(*inputs) if not isinstance(cm(*inputs), tuple) else cm(*inputs)[0], reference, 1e-4)


def test_int4_artifact_is_smaller_and_loads_without_torch(tmp_path):
    bundle = graphopt.models.load("llama")
    inputs = small_inputs(bundle)
    fp32 = graphopt.compile(bundle.model, inputs, progress=False)
    int4 = graphopt.compile(bundle.model, inputs, passes="int4", progress=False)
    sizes = {}
    for label, cm in (("fp32", fp32), ("int4", int4)):
        path = cm.save(str(tmp_path / label))
        sizes[label] = os.path.getsize(os.path.join(path, "model.onnx.data"))     # the weights
    assert sizes["int4"] < 0.4 * sizes["fp32"], sizes
    expected = int4(*inputs)
    expected = (expected[0] if isinstance(expected, tuple) else expected).numpy()
    np.testing.assert_array_equal(run_artifact_without_torch(str(tmp_path / "int4"), inputs), expected)
    manifest = graphopt.load(str(tmp_path / "int4")).manifest
    quant = [p for p in manifest["passes"] if p["name"] == "weight_quantization"][0]
    assert quant["modified"] and any("int4 g32 offset grid" in c for c in quant["changes"])
