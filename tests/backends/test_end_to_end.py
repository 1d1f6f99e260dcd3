"""compile() with the default preset on every architecture family, on both backends."""
import pytest
import torch

import graphopt
import graphopt.models.cnn
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


VISION = ["vit", "swin", "mobilenetv2", "mobilevit"]


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
@pytest.mark.parametrize("name", VISION)
def test_vision_models_match_eager(name, backend):
    bundle = graphopt.models.load(name)
    inputs = small_inputs(bundle)
    cm = graphopt.compile(bundle.model, inputs, backend=backend, progress=False)
    outs = cm(*inputs)
    for got, want in zip(
        outs if isinstance(outs, tuple) else (outs,), eager_outputs(bundle.model, inputs), strict=True
    ):
        assert_close_to_scale(got, want, 1e-4)


class CommonCnnOps(torch.nn.Module):
    """The CNN ops beyond conv/bn/relu that mobile and segmentation models use."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, 2, 1), torch.nn.BatchNorm2d(16), torch.nn.Hardswish())
        self.depthwise = torch.nn.Conv2d(16, 16, 3, 1, 1, groups=16)
        self.pointwise = torch.nn.Conv2d(16, 32, 1)
        self.squeeze, self.excite = torch.nn.Conv2d(32, 8, 1), torch.nn.Conv2d(8, 32, 1)
        self.group_norm = torch.nn.GroupNorm(4, 32)
        self.up = torch.nn.ConvTranspose2d(32, 16, 2, 2)
        self.layer_norm = torch.nn.LayerNorm(16)
        self.head = torch.nn.Linear(16, 10)

    def forward(self, x):
        F = torch.nn.functional
        y = F.relu6(self.pointwise(self.depthwise(self.stem(x))))
        y = y * torch.sigmoid(self.excite(F.silu(self.squeeze(F.adaptive_avg_pool2d(y, 1)))))
        y = F.max_pool2d(F.gelu(self.group_norm(y)), 2, ceil_mode=True)      # stride left to the kernel
        y = F.interpolate(self.up(y), scale_factor=2, mode="bilinear", align_corners=False)
        y = F.avg_pool2d(y, 3, 1, 1, count_include_pad=False)
        return self.head(self.layer_norm(y.flatten(2).transpose(1, 2)).mean(1))


@pytest.mark.parametrize("backend", ["onnxruntime", "tvm"])
def test_common_cnn_ops_lower_exactly(backend):
    pytest.importorskip("tvm") if backend == "tvm" else None
    model = CommonCnnOps().eval()
    with torch.no_grad():
        graphopt.models.cnn.randomise_batchnorm(model, torch.Generator().manual_seed(0))
    x = torch.randn(1, 3, 30, 30, generator=torch.Generator().manual_seed(1))    # odd sizes: ceil_mode matters
    cm = graphopt.compile(model, (x,), backend=backend, progress=False)
    assert_close_to_scale(cm(x), model(x), 1e-5)


class _AttentionThenReshape(torch.nn.Module):
    """Swin's pattern: the attention output transposed and reshaped with no .contiguous()."""

    def forward(self, q, k, v):
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1) * 2


@pytest.mark.parametrize("backend", ["onnxruntime", "tvm"])
def test_reshape_of_attention_output_lowers(backend):
    pytest.importorskip("tvm") if backend == "tvm" else None
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(4, 2, 16, 8, generator=g) for _ in range(3))
    model = _AttentionThenReshape().eval()
    cm = graphopt.compile(model, (q, k, v), passes="none", backend=backend, progress=False)
    assert_close_to_scale(cm(q, k, v), model(q, k, v), 1e-5)


def test_dynamic_sequence_length_on_onnxruntime():
    bundle = graphopt.models.load("llama")
    inputs = bundle.example_inputs(seq_len=16)
    from graphopt.frontend.torch_export import sequence_dims
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
    pytest.importorskip("tvm") if backend == "tvm" else None
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 8, 16, generator=g)
    k, v = torch.randn(2, 1, 8, 16, generator=g), torch.randn(2, 1, 8, 16, generator=g)
    k_batch, v_batch = torch.randn(1, 4, 8, 16, generator=g), torch.randn(1, 4, 8, 16, generator=g)
    inputs = (q, k, v, k_batch, v_batch)
    model = _BroadcastAttention().eval()
    cm = graphopt.compile(model, inputs, passes="none", backend=backend, progress=False)
    again = graphopt.backends.get_backend(backend).compile(cm.captured)   # the rewrite is idempotent
    for executable in (cm.executable, again):
        for got, want in zip(executable.run(inputs), model(*inputs), strict=True):
            assert_close_to_scale(got, want, 1e-5)
