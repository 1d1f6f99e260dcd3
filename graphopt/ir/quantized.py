"""Block-quantized weights and the graphopt op that multiplies by them.

Layout (the one ONNX Runtime's com.microsoft MatMulNBits reads, so no repacking at export):
a weight W [N, K] is cut into row-aligned blocks of `block_size` along K (the last block
padded), each block gets a float scale and an unsigned zero point, and
    W[n, k] = (q[n, k] - zero_point[n, k // block_size]) * scale[n, k // block_size]
with q in [0, 2**bits). `packed` is uint8 [N, n_blocks, block_size * bits // 8], low nibble
first for 4 bits; `scales` is float32 (or float16, to store half the bytes) [N * n_blocks];
`zero_points` is uint8, two per byte (low nibble first, rows padded to whole bytes) for 4
bits, one per byte for 8 bits, or empty: every zero point is 2**(bits - 1).
Per-channel quantization is one block per row where K allows it (see per_channel_block_size).

Grids (`quantize_weight(grid=...)`):
  "minmax"    the block's range widened to contain 0, an integer zero point;
  "offset"    the block's exact range: W = q * scale + minimum[n, block], a float minimum per
              block (llama.cpp's Q4_1 grid; a GGUF Q4_1 model's dequantized weights come back
              exactly). MatMulNBits has integer zero points only, so the graph computes
              matmul_nbits(x, q, scale) + blocksum(x) @ (minimum + 2**(bits-1) * scale).T;
  "symmetric" W = (q - 2**(bits-1)) * scale with scale = absmax / (2**(bits-1) - 1)
              (llama.cpp's Q8_0 grid for 8 bits).

`torch.ops.graphopt.matmul_nbits(x, packed, scales, zero_points, bits, block_size, k,
accuracy_level)` computes x @ W.T in fp32 (the reference semantics). `accuracy_level` is
only a lowering hint: ONNX Runtime's level 4 quantizes x to int8 per block inside the kernel.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

CLIP_SHRINKS = tuple(1.0 - 0.025 * i for i in range(21))   # 1.0 .. 0.5, for clip="mse"


def fitting_block_size(k: int, largest: int) -> int:
    """The largest power-of-two block <= `largest` that divides k (no padding), at least 16."""
    size = largest
    while size > 16 and k % size:
        size //= 2
    return size


def per_channel_block_size(k: int) -> int:
    """The block for "one scale per output channel". MatMulNBits wants power-of-two blocks
    >= 16, so a row whose width is not a power of two gets the widest power-of-two block that
    divides it (576 -> 64, 1536 -> 512) rather than padding (576 -> 1024 would store 78% more
    bytes); widths with no such divisor >= 16 are padded to the next power of two."""
    divisor = k & -k
    if divisor >= 16:
        return divisor
    return max(16, 1 << (k - 1).bit_length())


@dataclass
class QuantizedWeight:
    packed: torch.Tensor        # uint8 [N, n_blocks, block_size * bits // 8]
    scales: torch.Tensor        # float32 [N * n_blocks]
    zero_points: torch.Tensor   # uint8, packed as described in the module docstring
    bits: int
    block_size: int
    k: int
    minimums: torch.Tensor | None = None    # [N, n_blocks], grid "offset" (scales' dtype)

    @property
    def n(self) -> int:
        return self.packed.shape[0]

    @property
    def n_blocks(self) -> int:
        return self.packed.shape[1]

    @property
    def nbytes(self) -> int:
        parts = (self.packed, self.scales, self.zero_points) + ((self.minimums,) if self.minimums is not None else ())
        return sum(t.numel() * t.element_size() for t in parts)

    def dequantize(self) -> torch.Tensor:
        w = dequantize(self.packed, self.scales, self.zero_points, self.bits, self.block_size, self.k)
        if self.minimums is not None:
            w = w + block_offsets(self.scales, self.minimums, self.bits).t().repeat_interleave(
                self.block_size, dim=1)[:, :self.k]
        return w


def block_offsets(scales: torch.Tensor, minimums: torch.Tensor, bits: int) -> torch.Tensor:
    """The "offset" grid's per-block constant on top of (q - 2**(bits-1)) * scale, as
    [n_blocks, N] float32: minimum + 2**(bits-1) * scale, transposed for blocksum(x) @ it."""
    n, n_blocks = minimums.shape
    return (minimums.float() + (1 << (bits - 1)) * scales.float().reshape(n, n_blocks)).t()


def _pack_nibbles(values: torch.Tensor) -> torch.Tensor:
    """uint8 values < 16 along the last dim (even length) -> half as many bytes, low nibble first."""
    return values[..., 0::2] | (values[..., 1::2] << 4)


def _unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    low, high = packed & 0x0F, packed >> 4
    return torch.stack([low, high], dim=-1).flatten(-2)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """packed [..., blob] uint8 -> codes [..., block_size] uint8."""
    return _unpack_nibbles(packed) if bits == 4 else packed


def unpack_zero_points(zero_points: torch.Tensor, bits: int, n: int, n_blocks: int) -> torch.Tensor:
    """Packed zero points -> uint8 [N, n_blocks] (empty: all 2**(bits - 1))."""
    if zero_points.numel() == 0:
        return torch.full((n, n_blocks), 1 << (bits - 1), dtype=torch.uint8)
    if bits == 8:
        return zero_points.reshape(n, n_blocks)
    return _unpack_nibbles(zero_points.reshape(n, -1))[:, :n_blocks]


def dequantize(packed, scales, zero_points, bits: int, block_size: int, k: int) -> torch.Tensor:
    n, n_blocks = packed.shape[0], packed.shape[1]
    codes = unpack_codes(packed, bits).float()                                   # [N, nb, bs]
    zp = unpack_zero_points(zero_points, bits, n, n_blocks).float().unsqueeze(-1)
    w = (codes - zp) * scales.float().reshape(n, n_blocks, 1)
    return w.reshape(n, n_blocks * block_size)[:, :k]


def _blocks(w: torch.Tensor, block_size: int) -> torch.Tensor:
    """[N, K] -> [N, n_blocks, block_size]; the padding repeats each row's last value, so it
    never widens a block's range."""
    n, k = w.shape
    pad = (-k) % block_size
    if pad:
        w = torch.cat([w, w[:, -1:].expand(n, pad)], dim=1)
    return w.reshape(n, -1, block_size)


def _grid(lo: torch.Tensor, hi: torch.Tensor, bits: int):
    """Asymmetric grid covering [lo, hi] (widened to contain 0, so the zero point fits)."""
    qmax = (1 << bits) - 1
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    scale = (hi - lo) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero_point = torch.round(-lo / scale).clamp(0, qmax)
    return scale, zero_point


def search_grid(blocks: torch.Tensor, bits: int, importance: torch.Tensor):
    """Per block, the grid (scale, zero point) among min..max shrunk by each of CLIP_SHRINKS
    that minimises sum(importance * (dequantized - w)^2); blocks [..., bs], importance
    broadcastable to blocks."""
    lo, hi = blocks.amin(dim=-1, keepdim=True), blocks.amax(dim=-1, keepdim=True)
    scale, zero_point = _grid(lo, hi, bits)
    best_err = None
    for shrink in CLIP_SHRINKS:
        s, z = _grid(lo * shrink, hi * shrink, bits)
        err = (((_codes(blocks, s, z, bits) - z) * s - blocks) ** 2 * importance).sum(-1, keepdim=True)
        if best_err is None:
            best_err = err
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        scale, zero_point = torch.where(better, s, scale), torch.where(better, z, zero_point)
    return scale, zero_point


def _codes(blocks, scale, zero_point, bits):
    return torch.round(blocks / scale + zero_point).clamp(0, (1 << bits) - 1)


GRIDS = ("minmax", "offset", "symmetric")


def quantize_weight(w: torch.Tensor, bits: int, block_size: int | None, clip: str = "none",
                    zscore: float = 4.0, channel_weights: torch.Tensor | None = None, grid: str = "minmax",
                    scale_dtype: torch.dtype = torch.float32) -> QuantizedWeight:
    """Round-to-nearest quantization of w [N, K] in row-aligned blocks on `grid` (see the
    module docstring); scales (and minimums) stored as `scale_dtype`.

    clip: "none" (grid spans each block's min..max); "mse" (per block, shrink the range by
    the factor in CLIP_SHRINKS that minimises the block's squared reconstruction error,
    weighted per input channel by `channel_weights`, e.g. E[x_k^2] from calibration);
    "zscore" (clamp weights beyond `zscore` standard deviations of their row before
    choosing the grid).
    """
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    n, k = w.shape
    block_size = block_size or per_channel_block_size(k)
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16, got {block_size}")
    w = w.detach().float()
    if clip == "zscore":
        mean, std = w.mean(dim=1, keepdim=True), w.std(dim=1, keepdim=True)
        w = torch.clamp(w, mean - zscore * std, mean + zscore * std)
    elif clip not in ("none", "mse"):
        raise ValueError(f"clip must be 'none', 'mse' or 'zscore', got {clip!r}")
    if grid not in GRIDS:
        raise ValueError(f"grid must be one of {', '.join(GRIDS)}, got {grid!r}")
    blocks = _blocks(w, block_size)
    if grid != "minmax":
        if clip != "none":
            raise ValueError(f"grid {grid!r} takes clip='none' (it reproduces a grid, it does not search one)")
        if grid == "offset" and k % block_size:
            raise ValueError(f"grid 'offset' needs blocks that divide K ({k} % {block_size} != 0)")
        return _quantize_fixed_grid(blocks, bits, block_size, k, grid, scale_dtype)
    if clip == "mse":
        importance = torch.ones(k) if channel_weights is None else channel_weights.detach().float().clamp(min=0)
        importance = torch.cat([importance, importance.new_zeros((-k) % block_size)]).reshape(1, -1, block_size)
        scale, zero_point = search_grid(blocks, bits, importance)
    else:
        scale, zero_point = _grid(blocks.amin(dim=-1, keepdim=True), blocks.amax(dim=-1, keepdim=True), bits)
    return _pack(_codes(blocks, scale, zero_point, bits), scale, zero_point, bits, block_size, k)


def _quantize_fixed_grid(blocks, bits: int, block_size: int, k: int, grid: str, scale_dtype) -> QuantizedWeight:
    """The "offset" and "symmetric" grids; scale and minimum rounded to `scale_dtype` first,
    so the codes are computed against the grid that is stored."""
    qmax, middle = (1 << bits) - 1, 1 << (bits - 1)
    n = blocks.shape[0]
    if grid == "offset":
        lo, hi = blocks.amin(-1, keepdim=True), blocks.amax(-1, keepdim=True)
        scale = ((hi - lo) / qmax).to(scale_dtype).float()
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        lo = lo.to(scale_dtype).float()
        codes = torch.round((blocks - lo) / scale).clamp(0, qmax)
        minimums = lo.reshape(n, -1).to(scale_dtype).contiguous()
    else:
        scale = (blocks.abs().amax(-1, keepdim=True) / (middle - 1)).to(scale_dtype).float()
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        codes = (torch.round(blocks / scale) + middle).clamp(0, qmax)
        minimums = None
    codes = codes.to(torch.uint8)
    packed = _pack_nibbles(codes) if bits == 4 else codes
    return QuantizedWeight(packed.contiguous(), scale.reshape(-1).to(scale_dtype).contiguous(),
                           torch.zeros(0, dtype=torch.uint8), bits, block_size, k, minimums)


def _pack(codes, scale, zero_point, bits: int, block_size: int, k: int) -> QuantizedWeight:
    """codes [N, nb, bs], scale and zero_point [N, nb, 1] (floats) -> the packed layout."""
    n = codes.shape[0]
    codes = codes.to(torch.uint8)
    zp = zero_point.reshape(n, -1).to(torch.uint8)
    if bits == 4:
        packed = _pack_nibbles(codes)
        if zp.shape[1] % 2:
            zp = torch.cat([zp, torch.zeros(n, 1, dtype=torch.uint8)], 1)
        zp = _pack_nibbles(zp)
    else:
        packed = codes
    return QuantizedWeight(packed.contiguous(), scale.reshape(-1).float().contiguous(), zp.reshape(-1).contiguous(),
                           bits, block_size, k)


def gptq_quantize(w: torch.Tensor, hessian: torch.Tensor, bits: int, block_size: int | None,
                  damp: float = 0.01, batch: int = 128, clip: str = "none") -> QuantizedWeight:
    """GPTQ (Frantar et al., 2022): quantize columns left to right and push each column's
    rounding error onto the columns not yet quantized, weighted by the inverse Hessian
    H = X^T X of the layer's calibration inputs. Groups are row-aligned blocks as in RTN;
    a group's grid is chosen from its (error-updated) weights when the first column of
    the group is reached (clip="mse": the range shrink that minimises the group's error
    weighted by diag(H), as in quantize_weight)."""
    n, k = w.shape
    block_size = block_size or per_channel_block_size(k)
    w = w.detach().double().clone()
    h = hessian.detach().double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * torch.diag(h).mean() * torch.eye(k, dtype=h.dtype)
    h_inv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    n_blocks = -(-k // block_size)
    scale = torch.ones(n, n_blocks, 1, dtype=w.dtype)
    zero_point = torch.zeros(n, n_blocks, 1, dtype=w.dtype)
    codes = torch.zeros(n, n_blocks * block_size, dtype=w.dtype)
    batch = max(batch, block_size) if block_size <= k else k
    for start in range(0, k, batch):
        stop = min(start + batch, k)
        w1, err1, hinv1 = (
            w[:, start:stop].clone(),
            torch.zeros(n, stop - start, dtype=w.dtype),
            h_inv[start:stop, start:stop],
        )
        for i in range(stop - start):
            col = start + i
            g = col // block_size
            if col % block_size == 0:
                group = w1[:, i:i + block_size] if col + block_size <= stop else \
                    torch.cat([w1[:, i:], w[:, stop:min(col + block_size, k)]], 1)
                if clip == "mse":
                    weights = torch.diag(h)[col:col + group.shape[1]].reshape(1, -1)
                    s, z = search_grid(group, bits, weights)
                else:
                    s, z = _grid(group.amin(1, keepdim=True), group.amax(1, keepdim=True), bits)
                scale[:, g], zero_point[:, g] = s, z
            s, z = scale[:, g, 0], zero_point[:, g, 0]
            q = torch.round(w1[:, i] / s + z).clamp(0, (1 << bits) - 1)
            codes[:, col] = q
            err = (w1[:, i] - (q - z) * s) / hinv1[i, i]
            w1[:, i:] -= err.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            err1[:, i] = err
        w[:, stop:] -= err1 @ h_inv[start:stop, stop:]
    if k % block_size:
        codes[:, k:] = codes[:, k - 1:k]
    return _pack(codes.reshape(n, n_blocks, block_size), scale, zero_point, bits, block_size, k)


@torch.library.custom_op("graphopt::matmul_nbits", mutates_args=())
def matmul_nbits(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor,
                 bits: int, block_size: int, k: int, accuracy_level: int) -> torch.Tensor:
    w = dequantize(packed, scales, zero_points, bits, block_size, k)
    return torch.matmul(x, w.t().to(x.dtype))


@matmul_nbits.register_fake
def _matmul_nbits_fake(x, packed, scales, zero_points, bits, block_size, k, accuracy_level):
    return x.new_empty((*x.shape[:-1], packed.shape[0]))


MATMUL_NBITS = torch.ops.graphopt.matmul_nbits.default


@torch.library.custom_op("graphopt::matmul_nbits_minimum", mutates_args=())
def matmul_nbits_minimum(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, minimums: torch.Tensor,
                         bits: int, block_size: int, k: int) -> torch.Tensor:
    """x @ W^T for the "offset" grid in one op, W = code * scale + minimum per block. Passes
    emit matmul_nbits plus blocksum(x) @ offsets (what ONNX Runtime's MatMulNBits takes); the
    TVM backend folds that into this op, which its kernel dequantizes in one step."""
    n, n_blocks = packed.shape[0], packed.shape[1]
    codes = unpack_codes(packed, bits).float()
    w = codes * scales.float().reshape(n, n_blocks, 1) + minimums.float().reshape(n, n_blocks, 1)
    return torch.matmul(x, w.reshape(n, -1)[:, :k].t().to(x.dtype))


@matmul_nbits_minimum.register_fake
def _matmul_nbits_minimum_fake(x, packed, scales, minimums, bits, block_size, k):
    return x.new_empty((*x.shape[:-1], packed.shape[0]))


MATMUL_NBITS_MINIMUM = torch.ops.graphopt.matmul_nbits_minimum.default


@torch.library.custom_op("graphopt::embedding_nbits", mutates_args=())
def embedding_nbits(indices: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor,
                    bits: int, block_size: int, k: int) -> torch.Tensor:
    """Rows `indices` of the block-quantized table, dequantized: embedding(indices, W)."""
    n, n_blocks = packed.shape[0], packed.shape[1]
    flat = indices.reshape(-1)
    codes = unpack_codes(packed.index_select(0, flat), bits).float()
    zp = unpack_zero_points(zero_points, bits, n, n_blocks).index_select(0, flat).float().unsqueeze(-1)
    rows = (codes - zp) * scales.float().reshape(n, n_blocks).index_select(0, flat).unsqueeze(-1)
    return rows.reshape(*indices.shape, n_blocks * block_size)[..., :k]


@embedding_nbits.register_fake
def _embedding_nbits_fake(indices, packed, scales, zero_points, bits, block_size, k):
    return scales.new_empty((*indices.shape, k), dtype=torch.float32)


EMBEDDING_NBITS = torch.ops.graphopt.embedding_nbits.default


def quantized_bytes(n: int, k: int, bits: int, block_size: int | None) -> int:
    """Bytes of the packed layout for a [n, k] weight (codes + fp32 scales + zero points)."""
    block_size = block_size or per_channel_block_size(k)
    n_blocks = -(-k // block_size)
    zero_point_bytes = n * n_blocks if bits == 8 else n * (-(-n_blocks // 2))
    return n * n_blocks * block_size * bits // 8 + n * n_blocks * 4 + zero_point_bytes
