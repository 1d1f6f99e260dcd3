"""Causal attention over a preallocated KV cache: the graphopt op a generation graph uses.

    out, present_key, present_value = torch.ops.graphopt.kv_attention(
        query, key, value, past_key, past_value, seqlens_k, total_length, num_heads, kv_num_heads, scale,
        cos_cache, sin_cache)

query [B, S, Hq*D], key/value [B, S, Hkv*D] are this call's tokens (rotary already applied);
past_key/past_value [B, Hkv, M, D] are the cache buffers, M their capacity. seqlens_k [B]
(int32) holds each row's total length minus one after this call, total_length (int32, 0-d)
the batch's longest total length. With cos_cache/sin_cache [max_positions, D/2] the op
applies rotary embeddings (rotate-half convention) to query and key first, at each token's
position in its row; without them query and key arrive rotated. A call is a prompt when
S == total_length: every row starts
at position 0 (rows shorter than S are right-padded; their padding writes cache slots that
later tokens overwrite before anyone reads them). Otherwise row b's tokens go to positions
seqlens_k[b] + 1 - S onwards. present = past with this call's keys/values written in; query
position s of row b attends causally to cache positions 0 .. past_b + s.

A cache of a narrower float type than the query (float16 buffers, float32 model) runs the
attention in the cache's type, as ONNX Runtime does: query, key, value and the rotary tables
are rounded to it, scores and softmax are computed in float32 from the rounded values, and the
output is rounded to it before it returns in the query's type.

These are ONNX Runtime's com.microsoft.GroupQueryAttention semantics: its CPU kernel writes
in place when present and past are one buffer (I/O binding), so a token costs no cache copy.
The torch implementation here is the reference (it clones the buffers).
"""
from __future__ import annotations

import torch


@torch.library.custom_op("graphopt::kv_attention", mutates_args=())
def kv_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, past_key: torch.Tensor,
                 past_value: torch.Tensor, seqlens_k: torch.Tensor, total_length: torch.Tensor,
                 num_heads: int, kv_num_heads: int, scale: float, cos_cache: torch.Tensor | None = None,
                 sin_cache: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, seq, _ = query.shape
    capacity, head_dim = past_key.shape[2], past_key.shape[3]
    out_dtype, compute = query.dtype, past_key.dtype
    if compute != out_dtype:
        query, key, value = (t.to(compute).float() for t in (query, key, value))
        if cos_cache is not None and sin_cache is not None:
            cos_cache, sin_cache = cos_cache.to(compute).float(), sin_cache.to(compute).float()
    prompt = seq == int(total_length)
    q = query.reshape(batch, seq, num_heads, head_dim).transpose(1, 2)
    k = key.reshape(batch, seq, kv_num_heads, head_dim).transpose(1, 2)
    if cos_cache is not None:
        starts = [0 if prompt else int(seqlens_k[b]) + 1 - seq for b in range(batch)]
        positions = torch.stack([torch.arange(start, start + seq) for start in starts]).clamp(0, cos_cache.shape[0] - 1)
        q, k = _rotate(q, cos_cache, sin_cache, positions), _rotate(k, cos_cache, sin_cache, positions)
        q = q.to(compute).to(q.dtype)
    k = k.to(past_key.dtype)
    v = value.reshape(batch, seq, kv_num_heads, head_dim).transpose(1, 2).to(past_value.dtype)
    present_key, present_value = past_key.clone(), past_value.clone()
    out = query.new_zeros(batch, num_heads, seq, head_dim)
    group = num_heads // kv_num_heads
    for b in range(batch):
        total = int(seqlens_k[b]) + 1
        start = 0 if prompt else total - seq
        if start < 0 or start + seq > capacity:
            raise ValueError(f"kv_attention: row {b} writes cache positions {start}..{start + seq - 1}, "
                             f"outside the cache's {capacity} positions")
        present_key[b, :, start:start + seq] = k[b]
        present_value[b, :, start:start + seq] = v[b]
        keys = present_key[b, :, :start + seq].float().repeat_interleave(group, 0)
        values = present_value[b, :, :start + seq].float().repeat_interleave(group, 0)
        scores = (q[b].float() @ keys.transpose(-1, -2)) * scale
        visible = torch.arange(start + seq).unsqueeze(0) <= (start + torch.arange(seq)).unsqueeze(1)
        scores = scores.masked_fill(~visible, float("-inf"))
        out[b] = (torch.softmax(scores, -1) @ values).to(compute).to(query.dtype)
    out = out.transpose(1, 2).reshape(batch, seq, num_heads * head_dim).to(out_dtype)
    return out, present_key, present_value


def _rotate(x: torch.Tensor, cos_cache: torch.Tensor, sin_cache: torch.Tensor, positions: torch.Tensor):
    """Rotary embedding of x [B, H, S, D] at positions [B, S], rotate-half convention."""
    cos = torch.cat([cos_cache[positions]] * 2, -1).unsqueeze(1)      # [B, 1, S, D]
    sin = torch.cat([sin_cache[positions]] * 2, -1).unsqueeze(1)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos + rotated * sin


@kv_attention.register_fake
def _kv_attention_fake(query, key, value, past_key, past_value, seqlens_k, total_length, num_heads, kv_num_heads,
                       scale, cos_cache=None, sin_cache=None):
    return torch.empty_like(query), torch.empty_like(past_key), torch.empty_like(past_value)


CACHE_DTYPES = {"float32": torch.float32, "float16": torch.float16}


KV_ATTENTION = torch.ops.graphopt.kv_attention.default
