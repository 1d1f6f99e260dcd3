import hypothesis.strategies as st
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings

from graphopt.ir.quantized import (fitting_block_size, gptq_quantize, per_channel_block_size, quantize_weight,
                                   quantized_bytes)


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
