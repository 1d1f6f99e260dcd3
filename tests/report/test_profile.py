"""ONNX Runtime kernel profiles mapped back to the exported graph."""
from __future__ import annotations

import os

import numpy as np
import onnx
import pytest

from graphopt.analysis.cost import graph_cost
from graphopt.report.profile import interleaved_ms, module_of, profile_onnx


def _model_path(compiled) -> str:
    return os.path.join(compiled.executable.workdir, "model.onnx")


def _feed(compiled):
    return {n: x.numpy() for n, x in zip(compiled.executable.runner.input_names, compiled.captured.example_inputs)}


def test_module_of_drops_the_wrapper_and_the_node_scope():
    namespace = (": graphopt.frontend.torch_export._FlatIO/model: pkg.Net/model.blocks: torch.nn.Sequential/"
                 "model.blocks.0: pkg.Block/model.blocks.0.bn1: torch.nn.BatchNorm2d/bn_1: aten.batch_norm.default")
    assert module_of(namespace) == ("blocks.0.bn1", "BatchNorm2d")
    assert module_of(": graphopt.frontend.torch_export._FlatIO/model: pkg.Net/add: aten.add.Tensor") == ("", "Net")
    assert module_of("") == ("", "")


def test_every_resnet_kernel_maps_to_a_node_with_module_and_source(resnet_compiled):
    profile = profile_onnx(_model_path(resnet_compiled), _feed(resnet_compiled), threads=1, runs=3)
    exported = {n.name: n.op_type for n in onnx.load(_model_path(resnet_compiled), load_external_data=False).graph.node}
    assert profile.kernels and profile.unmapped_ms == 0
    for k in profile.kernels:
        assert k.graph_node in exported, k
        assert k.ms >= 0 and (k.module or k.module_class == "SmallResNet") and k.source.startswith("cnn.py:"), k
    convs = [k for k in profile.kernels if k.op == "Conv"]
    assert convs and all(k.graph_op == "Conv" for k in convs)      # fused Conv+Relu kernels map to the Conv
    assert profile.latency_ms > 0 and profile.threads == 1


def test_kernel_macs_and_weight_bytes_add_up_to_the_graph(resnet_compiled):
    profile = profile_onnx(_model_path(resnet_compiled), _feed(resnet_compiled), threads=1, runs=2)
    assert sum(k.macs for k in profile.kernels) == graph_cost(resnet_compiled.graph_module).macs
    model = onnx.load(_model_path(resnet_compiled), load_external_data=False)
    stored = sum(int(np.prod(t.dims)) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
                 for t in model.graph.initializer)
    assert sum(k.weight_bytes for k in profile.kernels) == stored


def test_language_model_kernels_map_to_attention_and_mlp_modules(llama_compiled):
    profile = profile_onnx(_model_path(llama_compiled), _feed(llama_compiled), threads=1, runs=2)
    modules = {k.module for k in profile.kernels}
    assert any(m.endswith("self_attn.q_proj") for m in modules)
    assert any(m.endswith("mlp.down_proj") for m in modules)
    assert profile.unmapped_ms <= 0.05 * profile.kernel_ms
    matmuls = [k for k in profile.kernels if k.op == "MatMul" and k.module.endswith("mlp.up_proj")]
    assert matmuls and all(k.macs > 0 and k.weight_bytes > 0 for k in matmuls)


def test_interleaved_timing_returns_one_median_per_model(resnet_compiled):
    path = _model_path(resnet_compiled)
    times = interleaved_ms([path, path], _feed(resnet_compiled), threads=1, runs=4, warmup=1)
    assert len(times) == 2 and all(t > 0 for t in times)


def test_unknown_optimization_level_is_one_line_error(resnet_compiled):
    from graphopt.errors import BackendError
    with pytest.raises(BackendError, match="unknown onnxruntime optimization level 'max'"):
        profile_onnx(_model_path(resnet_compiled), _feed(resnet_compiled), threads=1, optimization_level="max")
