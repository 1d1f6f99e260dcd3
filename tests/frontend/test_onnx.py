"""ONNX files import into the same IR and compile like PyTorch models."""
import copy

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper

import graphopt
from graphopt.errors import CaptureError, UnsupportedOpError
from graphopt.models.cnn import randomise_batchnorm

from ..conftest import assert_close_to_scale, eager_outputs, small_inputs


@pytest.mark.parametrize("name", ["resnet", "bert", "llama", "mobilevit"])   # mobilevit: Resize
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
    with pytest.raises(
        UnsupportedOpError, match=r"ONNX node 'mystery' \(op Hardmax, domain ''\) in m.onnx is not supported"
    ):
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


def test_dynamic_dims_are_refused_for_onnx_files(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(_model_with("Relu"), path)
    with pytest.raises(CaptureError, match="m.onnx: ONNX files import with static shapes"):
        graphopt.capture(str(path), (torch.randn(2, 3),), dynamic_dims={0: {0: "batch"}})


def test_wrong_number_of_example_inputs(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(_model_with("Relu"), path)
    with pytest.raises(CaptureError, match=r"takes 1 inputs \(x\), got 2"):
        graphopt.capture(str(path), (torch.randn(2, 3), torch.randn(2, 3)))
    cm = graphopt.capture(str(path), (torch.randn(2, 3),))
    x = torch.randn(2, 3)
    torch.testing.assert_close(cm(x)[0], torch.relu(x))


def _resize_model(shape, attrs, scales=None, sizes=None):
    """One Resize node; scales/sizes as initializers, as exporters write them."""
    inputs = [("roi", np.zeros(0, np.float32)),
              ("scales", np.array(scales, np.float32)) if scales is not None else ("", None)]
    if sizes is not None:
        inputs.append(("sizes", np.array(sizes, np.int64)))
    return _one_node_model("Resize", shape, attrs, inputs, name="up")


@pytest.mark.parametrize("shape, attrs, scales, sizes", [
    ((1, 3, 5, 6), dict(mode="linear"), [1, 1, 2, 2], None),
    ((1, 3, 5, 6), dict(mode="linear", coordinate_transformation_mode="align_corners"), None, [1, 3, 7, 11]),
    ((1, 3, 8, 9), dict(mode="linear", coordinate_transformation_mode="pytorch_half_pixel"), None, [1, 3, 3, 4]),
    ((1, 3, 5, 6), dict(mode="cubic"), [1, 1, 2, 2], None),
    ((1, 3, 5, 6), dict(mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor"),
     [1, 1, 2, 3], None),
    ((1, 3, 5, 6), dict(mode="nearest", nearest_mode="round_prefer_ceil"), None, [1, 3, 9, 7]),
    ((1, 3, 5, 6), dict(mode="nearest"), [1, 1, 2, 2], None),
    ((2, 4, 7), dict(mode="linear"), [1, 1, 3], None),
    ((1, 2, 3, 4, 5), dict(mode="linear", coordinate_transformation_mode="align_corners"), None, [1, 2, 5, 6, 7]),
])
def test_resize_matches_onnxruntime(shape, attrs, scales, sizes, tmp_path):
    import onnxruntime as ort
    path = tmp_path / "resize.onnx"
    onnx.save(_resize_model(shape, attrs, scales, sizes), path)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    got = graphopt.capture(str(path), (x,))(x)[0]
    assert tuple(got.shape) == want.shape
    torch.testing.assert_close(got, torch.from_numpy(want), rtol=1e-5, atol=1e-5)   # fp32 weights rounded apart


@pytest.mark.parametrize("attrs, scales, match", [
    (dict(mode="linear", coordinate_transformation_mode="asymmetric"), [1, 1, 2, 2],
     "coordinate_transformation_mode=asymmetric"),
    (dict(mode="nearest"), [1, 1, 0.5, 0.5], "nearest_mode=round_prefer_floor"),   # 8 -> 4: halfway points
    (dict(mode="linear", antialias=1), [1, 1, 0.5, 0.5], "antialias=1"),
    (dict(mode="linear"), [1, 2, 2, 2], "change the batch or channel dims"),
])
def test_resize_without_a_torch_equivalent_names_the_setting(attrs, scales, match, tmp_path):
    path = tmp_path / "resize.onnx"
    onnx.save(_resize_model((1, 3, 8, 8), attrs, scales), path)
    with pytest.raises(UnsupportedOpError, match=rf"ONNX node 'up' \(op Resize.*{match}"):
        graphopt.capture(str(path), (torch.randn(1, 3, 8, 8),))


def _one_node_model(op_type, shape, attrs, constants=(), name="n"):
    """`op_type` on input x and the named constants (numpy arrays, as initializers; an empty
    name leaves that optional input out)."""
    from onnx import numpy_helper
    inits = [numpy_helper.from_array(value, key) for key, value in constants if key]
    node = helper.make_node(op_type, ["x", *(key for key, _ in constants)], ["y"], name=name, **attrs)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    return helper.make_model(
        helper.make_graph([node], "g", [x], [y], inits), opset_imports=[helper.make_opsetid("", 19)]
    )


_rng = np.random.default_rng(0)


@pytest.mark.parametrize("op_type, shape, attrs, constants", [
    ("Pad", (1, 3, 4, 5), {}, [("pads", np.array([0, 0, 1, 2, 0, 0, 2, 1])), ("value", np.array(1.5, np.float32))]),
    ("Pad", (1, 3, 4, 5), dict(mode="reflect"), [("pads", np.array([0, 0, 1, 2, 0, 0, 2, 1]))]),
    ("Pad", (1, 3, 4, 5), dict(mode="edge"), [("pads", np.array([0, 0, 0, 3, 0, 0, 0, 0]))]),
    ("Pad", (2, 3, 4), {}, [("pads", np.array([0, 1, -1, 0, 0, 2]))]),                        # crop and pad
    ("HardSigmoid", (2, 7), dict(alpha=0.3, beta=0.4), []),
    ("HardSwish", (2, 7), {}, []),
    ("Softplus", (2, 7), {}, []),
    ("Elu", (2, 7), dict(alpha=0.7), []),
    ("PRelu", (1, 4, 3, 3), {}, [("slope", _rng.random((4, 1, 1), dtype=np.float32))]),
    ("InstanceNormalization", (2, 4, 5, 5), dict(epsilon=1e-3),
     [("scale", _rng.random(4, dtype=np.float32)), ("bias", _rng.random(4, dtype=np.float32))]),
    ("ConvTranspose", (1, 4, 5, 5), dict(strides=[2, 2], pads=[1, 1, 1, 1], output_padding=[1, 1], group=2),
     [("w", _rng.standard_normal((4, 3, 3, 3), dtype=np.float32)), ("b", _rng.standard_normal(6, dtype=np.float32))]),
    ("CumSum", (2, 5, 3), {}, [("axis", np.array(1))]),                                    # RoBERTa's positions
    ("CumSum", (2, 5, 3), dict(exclusive=1, reverse=1), [("axis", np.array(-1))]),
])
def test_single_ops_match_onnxruntime(op_type, shape, attrs, constants, tmp_path):
    import onnxruntime as ort
    path = tmp_path / f"{op_type}.onnx"
    onnx.save(_one_node_model(op_type, shape, attrs, constants), path)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    got = graphopt.capture(str(path), (x,))(x)[0]
    assert tuple(got.shape) == want.shape
    torch.testing.assert_close(got, torch.from_numpy(want), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["onnxruntime", "tvm"])
def test_exported_mobile_cnn_ops_import_and_compile(backend, tmp_path):
    """hardswish, depthwise conv, squeeze-excite, GroupNorm (InstanceNormalization), ConvTranspose,
    bilinear upsampling (Resize), ceil-mode pooling: a torch.onnx export of them compiles."""
    from ..backends.test_end_to_end import CommonCnnOps
    pytest.importorskip("tvm") if backend == "tvm" else None
    model = CommonCnnOps().eval()
    with torch.no_grad():
        randomise_batchnorm(model, torch.Generator().manual_seed(0))
    x = torch.randn(1, 3, 30, 30, generator=torch.Generator().manual_seed(1))
    path = str(tmp_path / "cnn.onnx")
    torch.onnx.export(model, (x,), path, dynamo=True, verbose=False)
    cm = graphopt.compile(path, (x,), backend=backend, progress=False)
    assert_close_to_scale(cm(x), model(x), 1e-5)


@pytest.mark.parametrize("op_type, attrs, constants, match", [
    ("Pad", dict(mode="reflect"), [("pads", np.array([0, 1, 0, 0, 0, 1, 0, 0]))], r"pads only the spatial dims"),
    ("ConvTranspose", dict(output_shape=[10, 10]), [("w", np.ones((3, 2, 3, 3), np.float32))], "output_shape"),
    ("ConvTranspose", dict(pads=[0, 0, 1, 1]), [("w", np.ones((3, 2, 3, 3), np.float32))], "asymmetric pads"),
])
def test_cnn_op_settings_without_a_torch_equivalent_name_themselves(op_type, attrs, constants, match, tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(_one_node_model(op_type, (1, 3, 5, 5), attrs, constants), path)
    with pytest.raises(UnsupportedOpError, match=rf"ONNX node 'n' \(op {op_type}.*{match}"):
        graphopt.capture(str(path), (torch.randn(1, 3, 5, 5),))


def _attention_model(shapes, attrs, outputs=1):
    """One opset-23 Attention node; `shapes` maps its inputs (q, k, v, mask, past_key,
    past_value; None = left out) to (shape, onnx dtype)."""
    names = ["q", "k", "v", "mask", "past_key", "past_value"][:len(shapes)]
    inputs = [helper.make_tensor_value_info(n, dtype, list(shape)) for n, (shape, dtype) in zip(names, shapes) if shape]
    node = helper.make_node("Attention", [n if shape else "" for n, (shape, _) in zip(names, shapes)],
                            ["y", "present_key", "present_value"][:outputs], name="attn", **attrs)
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in node.output]
    return helper.make_model(helper.make_graph([node], "g", inputs, outs), opset_imports=[helper.make_opsetid("", 23)])


F32, BOOL = TensorProto.FLOAT, TensorProto.BOOL


@pytest.mark.parametrize("shapes, attrs, outputs", [
    ([((1, 4, 6, 8), F32), ((1, 4, 6, 8), F32), ((1, 4, 6, 8), F32), ((1, 1, 6, 6), BOOL)], {}, 1),
    ([((2, 4, 5, 8), F32), ((2, 2, 5, 8), F32), ((2, 2, 5, 8), F32)], dict(is_causal=1, scale=0.3), 1),   # GQA
    ([((1, 5, 32), F32), ((1, 7, 16), F32), ((1, 7, 16), F32), ((1, 5, 7), F32)],
     dict(q_num_heads=4, kv_num_heads=2), 1),                                                           # 3-d, additive
    ([((1, 2, 3, 8), F32), ((1, 2, 3, 8), F32), ((1, 2, 3, 8), F32), ((1, 1, 3, 7), BOOL),
      ((1, 2, 4, 8), F32), ((1, 2, 4, 8), F32)], {}, 3),                       # past keys/values, present out
    ([((1, 2, 4, 8), F32), ((1, 2, 4, 8), F32), ((1, 2, 4, 8), F32), ((1, 1, 4, 4), F32)], dict(is_causal=1), 1),
])
def test_attention_matches_onnxruntime(shapes, attrs, outputs, tmp_path):
    import onnxruntime as ort
    path = tmp_path / "attention.onnx"
    onnx.save(_attention_model(shapes, attrs, outputs), path)
    g = torch.Generator().manual_seed(0)
    feeds = [torch.rand(*shape, generator=g) > 0.3 if dtype == BOOL else torch.randn(*shape, generator=g)
             for shape, dtype in shapes]
    if shapes[3:4] and shapes[3][1] == BOOL:
        feeds[3][..., 0] = True                     # every query sees at least one key
    names = [i.name for i in onnx.load(path).graph.input]
    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {n: t.numpy() for n, t in zip(names, feeds)})
    got = graphopt.capture(str(path), tuple(feeds))(*feeds)
    assert len(got) == outputs
    for g_out, w_out in zip(got, want):
        torch.testing.assert_close(g_out, torch.from_numpy(w_out), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["onnxruntime", "tvm"])
def test_opset23_transformer_export_imports(backend, tmp_path):
    """torch.onnx at opset 23 (graphopt's own artifacts too) writes attention as one Attention node."""
    pytest.importorskip("tvm") if backend == "tvm" else None
    bundle = graphopt.models.load("qwen2")                 # grouped-query attention
    inputs = small_inputs(bundle)
    path = str(tmp_path / "qwen2.onnx")
    torch.onnx.export(bundle.model, inputs, path, dynamo=True, verbose=False, opset_version=23)
    assert "Attention" in {n.op_type for n in onnx.load(path, load_external_data=False).graph.node}
    cm = graphopt.compile(path, inputs, backend=backend, progress=False)
    outs = cm(*inputs)
    assert_close_to_scale(outs[0] if isinstance(outs, tuple) else outs, eager_outputs(bundle.model, inputs)[0], 1e-4)


def test_attention_mask_shorter_than_the_keys_is_padded_with_false(tmp_path):
    """The spec pads a short mask to the total length with -inf / False (ONNX Runtime 1.32
    rejects such masks, so the reference here is the same node given the padded mask)."""
    qkv = [((1, 2, 3, 8), F32)] * 3
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 3, 8, generator=g) for _ in range(3))
    short = torch.rand(1, 1, 3, 2, generator=g) > 0.5
    short[..., 0] = True
    outputs = []
    for mask in (short, F.pad(short, (0, 1), value=False)):
        path = tmp_path / f"attention{mask.shape[-1]}.onnx"
        onnx.save(_attention_model([*qkv, (tuple(mask.shape), BOOL)], {}), path)
        outputs.append(graphopt.capture(str(path), (q, k, v, mask))(q, k, v, mask)[0])
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)


def test_passes_see_linear_layers_and_attention_of_an_onnx_graph(tmp_path):
    """MatMul by a constant becomes a linear layer and opset-23 Attention an attention node,
    so head pruning works on an imported graph: it equals the PyTorch model with the dropped
    heads' output-projection columns zeroed."""
    from graphopt.passes import AttentionHeadPruning, ConstantFolding, DeadCodeElimination
    bundle = graphopt.models.load("llama")
    inputs = small_inputs(bundle)
    path = str(tmp_path / "llama.onnx")
    torch.onnx.export(bundle.model, inputs, path, dynamo=True, verbose=False, opset_version=23)
    captured = graphopt.capture(path, inputs)
    linears = [n for n in captured.graph_module.graph.nodes if n.target is torch.ops.aten.linear.default]
    assert len(linears) == 7 * len(bundle.model.model.layers) + 1          # q k v o gate up down, lm_head
    heads = AttentionHeadPruning(ratio=0.5, importance="l2")
    cm = graphopt.compile(path, inputs, passes=[ConstantFolding(), heads, DeadCodeElimination()],
                          backend="torch", progress=False)
    assert len(heads.pruned) == len(bundle.model.model.layers)
    masked = copy.deepcopy(bundle.model)
    with torch.no_grad():
        for layer, pruned in zip(masked.model.layers, heads.pruned.values()):
            layer.self_attn.o_proj.weight[:, pruned.dropped_query_columns()] = 0
    assert_close_to_scale(cm(*inputs), eager_outputs(masked, inputs)[0], 1e-5)
