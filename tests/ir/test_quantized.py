import hypothesis.strategies as st
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings

from graphopt.ir.quantized import (
    fitting_block_size,
    gptq_quantize,
    per_channel_block_size,
    quantize_weight,
    quantized_bytes,
)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 40), k=st.integers(1, 300), bits=st.sampled_from([4, 8]),
       block=st.sampled_from([16, 32, 64, 128, None]), seed=st.integers(0, 1000))
def test_rtn_error_is_at_most_half_a_step(n, k, bits, block, seed):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    q = quantize_weight(w, bits, block)
    bs = block or per_channel_block_size(k)
    step = q.scales.reshape(n, -1).repeat_interleave(bs, dim=1)[:, :k]
    assert q.dequantize().shape == (n, k)
    assert bool(((q.dequantize() - w).abs() <= step / 2 + 1e-6).all())
    assert q.nbytes == quantized_bytes(n, k, bits, block)


def test_weights_on_the_grid_are_exact():
    scale = torch.rand(8, 4, 1) + 0.1
    zero = torch.randint(0, 16, (8, 4, 1)).float()
    codes = torch.randint(0, 16, (8, 4, 32)).float()
    codes[..., 0], codes[..., 1] = 0, 15            # each block spans the full grid
    zero = zero.clamp(1, 14)                        # so 0 is inside the range
    w = ((codes - zero) * scale).reshape(8, 128)
    err = float((quantize_weight(w, 4, 32).dequantize() - w).abs().max())
    assert err <= 1e-6 * float(w.abs().max())          # float rounding only


def test_mse_clipping_never_increases_block_error():
    w = torch.randn(64, 256)
    w[3, 7] = 12.0                                  # an outlier widens its block's range
    plain, clipped = quantize_weight(w, 4, 64), quantize_weight(w, 4, 64, clip="mse")
    err = lambda q: ((q.dequantize() - w) ** 2).reshape(64, 4, 64).sum(-1)  # noqa: E731
    assert bool((err(clipped) <= err(plain) + 1e-6).all())
    assert float(err(clipped).sum()) < float(err(plain).sum())


def test_gptq_beats_rtn_on_correlated_inputs():
    torch.manual_seed(0)
    w = torch.randn(96, 256) * 0.05
    x = torch.randn(4096, 24) @ torch.randn(24, 256) + 0.1 * torch.randn(4096, 256)   # strongly correlated
    hessian = x.t() @ x
    for block in (32, 64, None):
        rtn, gptq = quantize_weight(w, 4, block), gptq_quantize(w, hessian, 4, block)
        out_err = lambda q: float(((x @ (q.dequantize() - w).t()) ** 2).mean())  # noqa: E731
        assert out_err(gptq) < 0.7 * out_err(rtn), block


def test_ops_match_dequantized_reference():
    torch.manual_seed(0)
    w = torch.randn(50, 72)
    x = torch.randn(2, 5, 72)
    ids = torch.tensor([[0, 49, 7], [3, 3, 1]])
    for bits, block in ((4, 32), (4, 64), (8, None)):
        q = quantize_weight(w, bits, block)
        y = torch.ops.graphopt.matmul_nbits(x, q.packed, q.scales, q.zero_points, bits, q.block_size, 72, 0)
        assert torch.allclose(y, x @ q.dequantize().t(), atol=1e-5)
        e = torch.ops.graphopt.embedding_nbits(ids, q.packed, q.scales, q.zero_points, bits, q.block_size, 72)
        assert torch.equal(e, F.embedding(ids, q.dequantize()))


def test_block_size_rules():
    assert per_channel_block_size(576) == 64 and per_channel_block_size(1024) == 1024
    assert per_channel_block_size(100) == 128 and per_channel_block_size(5) == 16
    assert fitting_block_size(576, 256) == 64 and fitting_block_size(1536, 256) == 256
    with pytest.raises(ValueError, match="power of two"):
        quantize_weight(torch.randn(4, 64), 4, 48)
    with pytest.raises(ValueError, match="bits"):
        quantize_weight(torch.randn(4, 64), 3, 32)


def q4_1_blocks(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """Weights as llama.cpp's Q4_1 stores them: per 32-block a float16 scale d and minimum m,
    codes 0..15 with both ends used; w = d * q + m."""
    g = torch.Generator().manual_seed(seed)
    d = (torch.rand(n, k // 32, 1, generator=g) * 0.02 + 1e-3).half().float()
    m = (-7.5 * d + torch.randn(n, k // 32, 1, generator=g) * 0.01).half().float()
    q = torch.randint(0, 16, (n, k // 32, 32), generator=g).float()
    q[..., 0], q[..., 1] = 0, 15
    return (q * d + m).reshape(n, k)


def test_offset_grid_gives_a_q4_1_tensor_back_exactly_in_float16_storage():
    w = q4_1_blocks(24, 128)
    q = quantize_weight(w, 4, 32, grid="offset", scale_dtype=torch.float16)
    assert q.scales.dtype == q.minimums.dtype == torch.float16 and q.zero_points.numel() == 0
    assert torch.equal(q.dequantize(), w)
    assert q.nbytes == 24 * 128 // 2 + 2 * 24 * 4 * 2            # 4 bits + a float16 scale and minimum per 32
    assert float((quantize_weight(w, 4, 32).dequantize() - w).abs().max()) > 1e-3   # an integer zero point cannot


def test_symmetric_grid_gives_a_q8_0_tensor_back_exactly():
    g = torch.Generator().manual_seed(1)
    d = (torch.rand(10, 4, 1, generator=g) * 0.01 + 1e-4).half().float()
    codes = torch.randint(-127, 128, (10, 4, 32), generator=g).float()
    codes[..., 0] = 127
    w = (codes * d).reshape(10, 128)
    q = quantize_weight(w, 8, 32, grid="symmetric", scale_dtype=torch.float16)
    assert torch.equal(q.dequantize(), w)


def test_fixed_grids_refuse_what_they_cannot_reproduce():
    with pytest.raises(ValueError, match="clip='none'"):
        quantize_weight(torch.randn(4, 64), 4, 32, clip="mse", grid="offset")
    with pytest.raises(ValueError, match="divide K"):
        quantize_weight(torch.randn(4, 48), 4, 32, grid="offset")
    with pytest.raises(ValueError, match="grid must be one of"):
        quantize_weight(torch.randn(4, 64), 4, 32, grid="nf4")


def test_offset_grid_lowers_exactly_to_onnx_runtime(tmp_path):
    import graphopt
    from graphopt.passes import WeightQuantization

    class Linear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(128, 24, bias=True)
            with torch.no_grad():
                self.proj.weight.copy_(q4_1_blocks(24, 128, seed=2))

        def forward(self, x):
            return self.proj(x)

    model, x = Linear().eval(), torch.randn(3, 5, 128)
    passes = [WeightQuantization(bits=4, group_size=32, grid="offset", scale_dtype="float16", accuracy_level=0,
                                    head_bits=None)]   # the only layer is also the output head
    cm = graphopt.compile(model, (x,), passes=passes, progress=False)
    with torch.no_grad():
        expected = model(x)
    assert float((cm(x) - expected).abs().max()) <= 1e-5 * float(expected.abs().max())
