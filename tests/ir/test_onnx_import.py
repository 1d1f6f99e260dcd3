"""ONNX files import into the same IR and compile like PyTorch models."""
import onnx
import pytest
import torch
from onnx import TensorProto, helper

import graphopt
from graphopt.errors import CaptureError, UnsupportedOpError

from ..conftest import assert_close_to_scale, eager_outputs, small_inputs


@pytest.mark.parametrize("name", ["resnet", "bert", "llama"])
def test_exported_onnx_imports_and_compiles(name, tmp_path):
    bundle = graphopt.models.load(name)
    inputs = small_inputs(bundle)
    path = str(tmp_path / f"{name}.onnx")
    torch.onnx.export(bundle.model, inputs, path, dynamo=True, verbose=False)
    cm = graphopt.compile(path, inputs, passes="default", backend="onnxruntime", progress=False)
    outs = cm(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    for got, want in zip(outs, eager_outputs(bundle.model, inputs)):
        assert_close_to_scale(got, want, 1e-4)
    assert cm.captured.source == "OnnxModule"


def _model_with(op_type, domain=""):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    node = helper.make_node(op_type, ["x"], ["y"], name="mystery", domain=domain)
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    return helper.make_model(helper.make_graph([node], "g", [x], [y]), opset_imports=opsets)


def test_unsupported_op_names_node_and_op(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(_model_with("Hardmax"), path)
    with pytest.raises(UnsupportedOpError, match=r"ONNX node 'mystery' \(op Hardmax, domain ''\) in m.onnx is not supported"):
        graphopt.capture(str(path), (torch.randn(2, 3),))
    onnx.save(_model_with("FancyOp", "my.domain"), path)
    with pytest.raises(UnsupportedOpError, match="op FancyOp, domain 'my.domain'"):
        graphopt.capture(str(path), (torch.randn(2, 3),))


def test_unreadable_or_missing_file(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a protobuf at all")
    with pytest.raises(CaptureError, match="bad.onnx is not a readable ONNX model"):
        graphopt.capture(str(bad), (torch.randn(2, 3),))
    with pytest.raises(CaptureError, match="not found"):
        graphopt.capture(str(tmp_path / "nope.onnx"), (torch.randn(2, 3),))


def test_wrong_number_of_example_inputs(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(_model_with("Relu"), path)
    with pytest.raises(CaptureError, match=r"takes 1 inputs \(x\), got 2"):
        graphopt.capture(str(path), (torch.randn(2, 3), torch.randn(2, 3)))
    cm = graphopt.capture(str(path), (torch.randn(2, 3),))
    x = torch.randn(2, 3)
    torch.testing.assert_close(cm(x)[0], torch.relu(x))
