"""Grouped-query scaled dot-product attention as one graphopt op, for backends with a kernel.

    out = torch.ops.graphopt.attention(query, key, value, mask, is_causal, scale, cos=None, sin=None)

query [B, Hq, Lq, D], key [B, Hkv, Lk, D], value [B, Hkv, Lk, Dv] with Hq a multiple of Hkv:
query head h reads key/value head h // (Hq / Hkv), what Hugging Face's repeat_kv expands and
torch's scaled_dot_product_attention(..., enable_gqa=True) computes without the copies. `mask`
(optional) is bool (true = attend) or float (added to the scores), broadcastable to
[B, Hq, Lq, Lk]; `is_causal` keeps key j <= query i; a row that attends no key is zeros.
With `cos` and `sin` ([B or 1, 1, L, D], Lq == Lk == L) query and key arrive without their
rotary embedding and the op applies it (rotate-half convention) first.

torch.export's decompositions split scaled_dot_product_attention into matmuls, a masked
softmax and the key/value expansion; as this op it survives re-export, so a backend can lower
it to one kernel (the TVM backend does: kernels/attention.c). The torch implementation is
torch's own and is the reference.
"""
from __future__ import annotations

import torch


@torch.library.custom_op("graphopt::attention", mutates_args=())
def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
              is_causal: bool, scale: float, cos: torch.Tensor | None = None,
              sin: torch.Tensor | None = None) -> torch.Tensor:
    if cos is not None and sin is not None:
        query, key = rotate(query, cos, sin), rotate(key, cos, sin)
    return torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, is_causal=is_causal,
                                                            scale=scale, enable_gqa=True)


@attention.register_fake
def _attention_fake(query, key, value, mask, is_causal, scale, cos=None, sin=None):
    return query.new_empty((*query.shape[:-1], value.shape[-1]))


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, rotate-half convention (Hugging Face's apply_rotary_pos_emb)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


ATTENTION = torch.ops.graphopt.attention.default
