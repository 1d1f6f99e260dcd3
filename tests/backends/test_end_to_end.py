"""compile() with the default preset on every architecture family, on both backends."""
import pytest
import torch

import graphopt
from graphopt.errors import BackendError, InputSpecError

from ..conftest import assert_close_to_scale, eager_outputs, small_inputs

FAMILIES = ["llama", "qwen2", "mistral", "gpt2", "bert", "falcon", "gptj", "phi3", "gemma2", "resnet", "densenet"]


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("preset", ["default", "fuse"])
def test_presets_match_eager(name, backend, preset):
    bundle = graphopt.models.load(name)
    inputs = small_inputs(bundle)
    cm = graphopt.compile(bundle.model, inputs, passes=preset, backend=backend, progress=False)
    outs = cm(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    for got, want in zip(outs, eager_outputs(bundle.model, inputs), strict=True):
        assert_close_to_scale(got, want, 1e-4)
    assert any(r.modified for r in cm.records)


def test_dynamic_sequence_length_on_onnxruntime():
    bundle = graphopt.models.load("llama")
    inputs = bundle.example_inputs(seq_len=16)
    from graphopt.ir.capture import sequence_dims
    cm = graphopt.compile(bundle.model, inputs, dynamic_dims=sequence_dims(inputs), progress=False)
    for seq in (9, 33):
        other = bundle.example_inputs(seq_len=seq, seed=seq)
        assert_close_to_scale(cm(*other), eager_outputs(bundle.model, other)[0], 1e-4)


def test_wrong_input_shape_or_dtype_is_a_one_line_error():
    bundle = graphopt.models.load("gpt2")
    cm = graphopt.compile(bundle.model, bundle.example_inputs(seq_len=8), progress=False)
    with pytest.raises(InputSpecError, match=r"input 'input_ids': expected shape \[1, 8\], got \[1, 9\]"):
        cm(bundle.example_inputs(seq_len=9)[0])
    with pytest.raises(InputSpecError, match="expected dtype int64, got float32"):
        cm(torch.zeros(1, 8))
    with pytest.raises(InputSpecError, match=r"expected 1 inputs \(input_ids\), got 2"):
        cm(*bundle.example_inputs(seq_len=8), torch.zeros(1))


def test_unknown_backend_is_clear():
    with pytest.raises(BackendError, match="unknown backend 'tensorrt'; available: torch, onnxruntime, tvm"):
        graphopt.compile(torch.nn.Linear(2, 2), (torch.randn(1, 2),), backend="tensorrt")


def test_op_without_onnx_translation_names_the_op():
    class Unsupported(torch.nn.Module):
        def forward(self, x):
            return torch.special.zeta(x, 2.0)

    with pytest.raises(graphopt.UnsupportedOpError, match="zeta") as info:
        graphopt.compile(Unsupported(), (torch.rand(4) + 1,), progress=False)
    assert "\n" not in str(info.value)


class _BroadcastAttention(torch.nn.Module):
    """Attention whose key/value broadcast over the query's heads (multi-query) or batch."""

    def forward(self, q, k, v, k_batch, v_batch):
        shared_head = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        shared_batch = torch.nn.functional.scaled_dot_product_attention(q, k_batch, v_batch)
        return shared_head, shared_batch


@pytest.mark.parametrize("backend", ["onnxruntime", "tvm"])
def test_broadcast_key_value_heads_lower_exactly(backend):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 8, 16, generator=g)
    k, v = torch.randn(2, 1, 8, 16, generator=g), torch.randn(2, 1, 8, 16, generator=g)
    k_batch, v_batch = torch.randn(1, 4, 8, 16, generator=g), torch.randn(1, 4, 8, 16, generator=g)
    inputs = (q, k, v, k_batch, v_batch)
    model = _BroadcastAttention().eval()
    cm = graphopt.compile(model, inputs, passes="none", backend=backend, progress=False)
    for got, want in zip(cm(*inputs), model(*inputs), strict=True):
        assert_close_to_scale(got, want, 1e-5)
