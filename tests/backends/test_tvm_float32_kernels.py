"""graphopt's float32 kernels on the TVM backend. Attention: scaled_dot_product_attention becomes
graphopt.attention and one call of kernels/attention.c, grouped key/value heads read in place;
every mask kind, causal flag, head size and grouping equals torch in float64; shapes the kernel
does not take stay TVM's own ops. RMSNorm: Hugging Face's five ops become graphopt.rms_norm
(kernels/rms_norm.c), equal to float64."""
import pytest
import torch

import graphopt
from graphopt.backends.tvm.dense_kernels import F32_KERNELS
from graphopt.backends.tvm.runner import cpu_flags
from graphopt.ir.attention import ATTENTION, rotate
from graphopt.ir.rms_norm import RESIDUAL_RMS_NORM, RMS_NORM

from ..conftest import assert_close_to_scale, run_artifact_without_torch

pytest.importorskip("tvm")

# target -> the attention kernel it gets; x86-64-v3 (AVX2) also where the host has AVX-512
TARGETS = [(target, kernel) for target, kernel in (("host", "f32_avx512"), ("x86-64-v3", "f32_avx2"))
           if set(F32_KERNELS[kernel][1]) <= (cpu_flags() or set())]


class Attention(torch.nn.Module):
    """q/k/v projections of x, then attention as Hugging Face writes it (repeat_kv when grouped)."""

    def __init__(self, width, heads, kv_heads, head_dim, value_dim, mask_kind, causal, rotary=False):
        super().__init__()
        torch.manual_seed(1)
        self.shape = heads, kv_heads, head_dim, value_dim
        self.q = torch.nn.Linear(width, heads * head_dim)
        self.k = torch.nn.Linear(width, kv_heads * head_dim)
        self.v = torch.nn.Linear(width, kv_heads * value_dim)
        self.mask_kind, self.causal, self.rotary = mask_kind, causal, rotary

    def tables(self, batch, length, head_dim):
        """Per-row positions (row b starts at b): cos/sin [batch, 1, length, head_dim]."""
        positions = torch.arange(length)[None] + torch.arange(batch)[:, None]
        frequencies = 10000.0 ** (-torch.arange(0, head_dim, 2).float() / head_dim)
        angles = torch.cat([positions[..., None] * frequencies] * 2, -1)[:, None]
        return angles.cos(), angles.sin()

    def forward(self, x, mask):
        b, length, _ = x.shape
        heads, kv_heads, head_dim, value_dim = self.shape
        q = self.q(x).view(b, length, heads, head_dim).transpose(1, 2)
        k = self.k(x).view(b, length, kv_heads, head_dim).transpose(1, 2)
        if self.rotary:
            cos, sin = self.tables(b, length, head_dim)
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        v = self.v(x).view(b, length, kv_heads, value_dim).transpose(1, 2)
        if heads != kv_heads:
            n = heads // kv_heads
            k = k[:, :, None].expand(b, kv_heads, n, length, head_dim).reshape(b, heads, length, head_dim)
            v = v[:, :, None].expand(b, kv_heads, n, length, value_dim).reshape(b, heads, length, value_dim)
        out = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=mask if self.mask_kind != "none" else None, is_causal=self.causal)
        return out.transpose(1, 2).reshape(b, length, heads * value_dim)


def make_mask(kind: str, batch: int, heads: int, length: int):
    generator = torch.Generator().manual_seed(2)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    if kind == "causal":
        return causal
    if kind == "padded-causal":                     # [b, 1, l, l]: row 1 left-padded by 5, first rows see nothing
        padding = torch.ones(batch, length, dtype=torch.bool)
        padding[-1, :5] = False
        return (causal & padding[:, None, :])[:, None]
    if kind == "random-per-head":
        return torch.rand(batch, heads, length, length, generator=generator) > 0.4
    if kind == "keys-only":                         # [b, 1, 1, l]: broadcast over heads and rows
        return (torch.rand(batch, 1, 1, length, generator=generator) > 0.3)
    if kind == "float":
        return torch.randn(batch, 1, length, length, generator=generator).masked_fill(~causal, float("-inf"))
    return torch.zeros(1)


def float64_attention(module: Attention, x, mask):
    """The module's attention with every product in float64 (the kernel's reference)."""
    double = {name: p.detach().double() for name, p in module.named_parameters()}
    b, length, _ = x.shape
    heads, kv_heads, head_dim, value_dim = module.shape
    x = x.double()
    q = (x @ double["q.weight"].T + double["q.bias"]).view(b, length, heads, head_dim).transpose(1, 2)
    k = (x @ double["k.weight"].T + double["k.bias"]).view(b, length, kv_heads, head_dim).transpose(1, 2)
    v = (x @ double["v.weight"].T + double["v.bias"]).view(b, length, kv_heads, value_dim).transpose(1, 2)
    if module.rotary:
        cos, sin = (t.double() for t in module.tables(b, length, head_dim))
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
    m = mask.double() if mask.dtype == torch.float32 else mask
    out = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=m if module.mask_kind != "none" else None, is_causal=module.causal, enable_gqa=True)
    return out.transpose(1, 2).reshape(b, length, heads * value_dim)


CASES = [  # heads, kv_heads, head_dim, value_dim, length, mask kind, causal
    (4, 2, 64, 64, 40, "padded-causal", False),
    (9, 3, 64, 64, 128, "causal", False),
    (4, 4, 32, 48, 17, "random-per-head", False),
    (6, 2, 16, 80, 33, "keys-only", False),
    (2, 1, 128, 128, 50, "float", False),
    (4, 2, 64, 64, 37, "none", True),
    (3, 3, 32, 32, 1, "none", False),
]


@pytest.mark.parametrize("target,kernel", TARGETS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}-d{c[2]}-dv{c[3]}-l{c[4]}-{c[5]}"
                         f"{'-causal' if c[6] else ''}")
def test_attention_kernel_equals_float64_attention(case, target, kernel):
    heads, kv_heads, head_dim, value_dim, length, mask_kind, causal = case
    module = Attention(48, heads, kv_heads, head_dim, value_dim, mask_kind, causal).eval()
    x = torch.randn(2, length, 48, generator=torch.Generator().manual_seed(3))
    mask = make_mask(mask_kind, 2, heads, length)
    cm = graphopt.compile(module, (x, mask), passes="none", backend="tvm",
                          backend_options={"threads": 2, "target": target}, progress=False)
    assert cm.executable.packed_weights["float32_kernel"] == kernel
    fused = cm.graph_module.graph.find_nodes(op="call_function", target=ATTENTION)
    assert len(fused) == 1
    if heads != kv_heads:      # repeat_kv's copies are gone: the op reads the projections' heads
        assert fused[0].args[1].meta["val"].shape[1] == kv_heads
    assert_close_to_scale(cm(x, mask), float64_attention(module, x, mask), 2e-6)


def test_a_row_that_attends_no_key_is_zeros_as_in_torch():
    module = Attention(32, 2, 2, 16, 16, "random-per-head", False).eval()
    x = torch.randn(1, 8, 32)
    mask = torch.ones(1, 2, 8, 8, dtype=torch.bool)
    mask[0, 1, 3] = False
    cm = graphopt.compile(module, (x, mask), passes="none", backend="tvm", progress=False)
    out = cm(x, mask).reshape(1, 8, 2, 16)
    assert torch.equal(out[0, 3, 1], torch.zeros(16))
    assert_close_to_scale(out.reshape(1, 8, 32), module(x, mask), 1e-5)


def test_shapes_the_kernel_does_not_take_stay_tvm_ops():
    module = Attention(48, 4, 2, 24, 24, "causal", False).eval()     # head size 24: not a multiple of 16
    x = torch.randn(1, 12, 48)
    mask = make_mask("causal", 1, 4, 12)
    cm = graphopt.compile(module, (x, mask), passes="none", backend="tvm", progress=False)
    assert cm.executable.packed_weights["float32_kernel"] is None
    assert not cm.graph_module.graph.find_nodes(op="call_function", target=ATTENTION)
    assert_close_to_scale(cm(x, mask), module(x, mask), 1e-5)


def test_llama_with_padding_runs_attention_in_the_kernel_and_without_torch(tmp_path):
    bundle = graphopt.models.load("llama")
    ids = bundle.example_inputs(seq_len=24)[0]
    ids = ids.expand(2, -1).contiguous()
    attention_mask = torch.ones_like(ids)
    attention_mask[1, :6] = 0
    cm = graphopt.compile(bundle.model, (ids, attention_mask), backend="tvm", progress=False)
    layers = bundle.model.config.num_hidden_layers
    assert len(cm.graph_module.graph.find_nodes(op="call_function", target=ATTENTION)) == layers
    graph = cm.graph_module.graph
    norms = [len(graph.find_nodes(op="call_function", target=op)) for op in (RMS_NORM, RESIDUAL_RMS_NORM)]
    assert norms == [1, 2 * layers]         # the first norm reads the embedding; the others, residual sums
    with torch.no_grad():
        want = bundle.model(ids, attention_mask=attention_mask).logits
    assert_close_to_scale(cm(ids, attention_mask), want, 1e-5)
    path = cm.save(str(tmp_path / "llama"))
    assert graphopt.load(path).manifest["backend_options"]["float32_kernel"].startswith("f32_")
    assert_close_to_scale(run_artifact_without_torch(path, (ids, attention_mask)), want, 1e-5)


def test_a_graph_prepared_for_the_kernel_lowers_to_tvm_ops_for_a_target_without_it():
    """The rewrite happens in the IR; compiled again for x86-64-v2 (no AVX2: no kernel), the same
    graph's graphopt.attention becomes Relax ops, fully masked rows still zeros."""
    from graphopt.backends.tvm.lower import TvmBackend
    module = Attention(32, 4, 2, 16, 16, "padded-causal", False).eval()
    x = torch.randn(2, 12, 32)
    mask = make_mask("padded-causal", 2, 4, 12)
    cm = graphopt.compile(module, (x, mask), passes="none", backend="tvm", progress=False)
    assert cm.graph_module.graph.find_nodes(op="call_function", target=ATTENTION)
    portable = TvmBackend(threads=2, target="x86-64-v2").compile(cm.captured)
    assert portable.packed_weights["float32_kernel"] is None
    got = portable.run((x, mask))[0]
    assert_close_to_scale(got, float64_attention(module, x, mask), 2e-6)


class RMSNormBlock(torch.nn.Module):
    """Hugging Face's RMSNorm (as LlamaRMSNorm writes it) around a linear layer."""

    def __init__(self, width, square):
        super().__init__()
        torch.manual_seed(4)
        self.weight = torch.nn.Parameter(torch.randn(width))
        self.linear = torch.nn.Linear(width, width)
        self.square = square

    def norm(self, x):
        variance = (x.pow(2) if self.square == "pow" else x * x).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(variance + 1e-6))

    def forward(self, x):
        return self.norm(self.linear(self.norm(x)))


@pytest.mark.parametrize("target,kernel", TARGETS)
@pytest.mark.parametrize("square", ["pow", "product"])
def test_rms_norm_kernel_equals_float64(square, target, kernel):
    module = RMSNormBlock(80, square).eval()
    x = torch.randn(3, 7, 80, generator=torch.Generator().manual_seed(5)) * 4
    cm = graphopt.compile(module, (x,), passes="none", backend="tvm",
                          backend_options={"threads": 2, "target": target}, progress=False)
    assert len(cm.graph_module.graph.find_nodes(op="call_function", target=RMS_NORM)) == 2
    assert cm.executable.packed_weights["float32_kernel"] == kernel
    double = RMSNormBlock(80, square).double().eval()
    assert_close_to_scale(cm(x), double(x.double()), 2e-6)


def test_an_rms_norm_the_kernel_does_not_take_stays_tvm_ops():
    module = RMSNormBlock(40, "pow").eval()                 # width 40: not a multiple of 16
    x = torch.randn(2, 5, 40)
    cm = graphopt.compile(module, (x,), passes="none", backend="tvm", progress=False)
    assert not cm.graph_module.graph.find_nodes(op="call_function", target=RMS_NORM)
    assert_close_to_scale(cm(x), module(x), 1e-5)


def test_a_graph_with_rms_norm_lowers_to_tvm_ops_for_a_target_without_the_kernel():
    from graphopt.backends.tvm.lower import TvmBackend
    module = RMSNormBlock(32, "pow").eval()
    x = torch.randn(2, 5, 32)
    cm = graphopt.compile(module, (x,), passes="none", backend="tvm", progress=False)
    assert cm.graph_module.graph.find_nodes(op="call_function", target=RMS_NORM)
    portable = TvmBackend(threads=2, target="x86-64-v2").compile(cm.captured)
    assert portable.packed_weights["float32_kernel"] is None
    assert_close_to_scale(portable.run((x,))[0], RMSNormBlock(32, "pow").double().eval()(x.double()), 2e-6)


class ResidualBlock(RMSNormBlock):
    """A transformer layer's residual stream: h = x + f(norm(x)), then norm(h), h read again after."""

    def forward(self, x):
        h = x + self.linear(self.norm(x))
        return self.norm(h) * 2 + h


@pytest.mark.parametrize("target,kernel", TARGETS)
def test_the_residual_add_before_a_norm_is_written_by_the_norm_kernel(target, kernel):
    module = ResidualBlock(64, "pow").eval()
    x = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(6))
    cm = graphopt.compile(module, (x,), passes="none", backend="tvm",
                          backend_options={"threads": 2, "target": target}, progress=False)
    graph = cm.graph_module.graph
    assert len(graph.find_nodes(op="call_function", target=RESIDUAL_RMS_NORM)) == 1
    assert len(graph.find_nodes(op="call_function", target=RMS_NORM)) == 1
    assert_close_to_scale(cm(x), ResidualBlock(64, "pow").double().eval()(x.double()), 2e-6)
    from graphopt.backends.tvm.lower import TvmBackend
    portable = TvmBackend(threads=2, target="x86-64-v2").compile(cm.captured)      # Relax ops, no kernel
    assert_close_to_scale(portable.run((x,))[0], ResidualBlock(64, "pow").double().eval()(x.double()), 2e-6)



@pytest.mark.parametrize("target,kernel", TARGETS)
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 2, 64), (3, 3, 16)])
def test_rotary_embedding_of_query_and_key_is_applied_in_the_kernel(heads, kv_heads, head_dim, target, kernel):
    """Hugging Face's apply_rotary_pos_emb on q and k goes into graphopt.attention (cos/sin per
    batch row here); its two rotary kernels are gone."""
    module = Attention(48, heads, kv_heads, head_dim, head_dim, "padded-causal", False, rotary=True).eval()
    x = torch.randn(2, 21, 48, generator=torch.Generator().manual_seed(7))
    mask = make_mask("padded-causal", 2, heads, 21)
    cm = graphopt.compile(module, (x, mask), passes="none", backend="tvm",
                          backend_options={"threads": 2, "target": target}, progress=False)
    [fused] = cm.graph_module.graph.find_nodes(op="call_function", target=ATTENTION)
    assert len(fused.args) == 8 and fused.args[6] is not None
    assert not cm.graph_module.graph.find_nodes(op="call_function", target=torch.ops.aten.slice.Tensor)
    want = float64_attention(module, x, mask)
    assert_close_to_scale(cm(x, mask), want, 2e-6)
    from graphopt.backends.tvm.lower import TvmBackend
    portable = TvmBackend(threads=2, target="x86-64-v2").compile(cm.captured)      # Relax ops, no kernel
    assert_close_to_scale(portable.run((x, mask))[0], want, 2e-6)
