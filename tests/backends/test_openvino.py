"""The OpenVINO backend: the same export as ONNX Runtime's, run by OpenVINO's CPU plugin."""
import json
import os

import pytest
import torch

import graphopt
from graphopt.errors import BackendError

from ..conftest import assert_close_to_scale, eager_outputs, run_artifact_without_torch, small_inputs

pytest.importorskip("openvino")


@pytest.mark.parametrize("name", ["llama", "resnet", "mixtral"])
def test_f32_matches_eager(name):
    bundle = graphopt.models.load(name)
    inputs = small_inputs(bundle)
    cm = graphopt.compile(bundle.model, inputs, backend="openvino", progress=False)
    assert_close_to_scale(cm(*inputs), eager_outputs(bundle.model, inputs)[0], 1e-4)


def test_int4_weights_run_as_compressed_weights_and_the_artifact_loads_without_torch(tmp_path):
    import openvino as ov
    bundle = graphopt.models.load("llama")
    inputs = small_inputs(bundle)
    cm = graphopt.compile(bundle.model, inputs, passes="int4", backend="openvino", progress=False)
    assert_close_to_scale(cm(*inputs), cm.captured(*inputs)[0], 1e-4)      # f32: the quantized graph exactly
    path = cm.save(str(tmp_path / "llama-int4-ov"))
    assert sorted(f for f in os.listdir(path) if f.startswith("model")) == ["model.bin", "model.xml"]
    types = {op.get_element_type().get_type_name() for op in ov.Core().read_model(f"{path}/model.xml").get_ops()
             if op.get_type_name() == "Constant"}
    assert "u4" in types                                                    # packed nibbles stay 4-bit
    manifest = json.load(open(f"{path}/manifest.json"))
    assert manifest["backend"] == "openvino" and manifest["backend_options"]["precision"] == "f32"
    assert_close_to_scale(torch.from_numpy(run_artifact_without_torch(path, inputs)), cm(*inputs), 1e-6)


def test_reduced_precision_hint_is_recorded_and_stays_close():
    bundle = graphopt.models.load("llama")
    inputs = small_inputs(bundle)
    cm = graphopt.compile(bundle.model, inputs, backend="openvino", backend_options={"precision": "bf16", "threads": 2},
                          progress=False)
    options = cm.executable.save_files(str(__import__("tempfile").mkdtemp()))
    assert options["precision"] == "bf16" and options["precision_on_compile_host"] in ("bf16", "f32")
    assert_close_to_scale(cm(*inputs), eager_outputs(bundle.model, inputs)[0], 5e-2)


def test_unknown_precision_is_a_one_line_error():
    with pytest.raises(BackendError, match="unknown OpenVINO precision 'int3'; use one of f32, bf16, f16, default"):
        graphopt.backends.get_backend("openvino", precision="int3")


def test_bf16_with_one_thread_is_refused_where_openvino_would_crash():
    import openvino as ov
    if "BF16" not in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        pytest.skip("this CPU has no bf16: OpenVINO runs f32 and does not crash")
    bundle = graphopt.models.load("llama")
    with pytest.raises(BackendError, match=r"crashes \(SIGFPE\) compiling bf16 with one thread on this CPU"):
        graphopt.compile(bundle.model, small_inputs(bundle), backend="openvino",
                         backend_options={"precision": "default", "threads": 1}, progress=False)
