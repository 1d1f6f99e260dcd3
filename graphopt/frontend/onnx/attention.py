"""ONNX translation of Attention (opset 23): grouped heads, masks, causal and windowed, past key/value.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...errors import UnsupportedOpError
from .registry import ONNX_TYPE_OF, register


def _attention(s, a, q, k, v, mask=None, past_key=None, past_value=None, *rest):
    """ONNX Attention (opset 23) as scaled_dot_product_attention: 4-d or 3-d (heads in the
    last dim) inputs, grouped key/value heads, a boolean or additive mask (shorter masks are
    padded as the spec says), causal masking, past keys/values (present ones as outputs)."""
    def unsupported(what: str):
        return UnsupportedOpError(f"{s.node_desc}: Attention with {what} is not supported")

    if a.get("softcap", 0.0):
        raise unsupported(f"softcap={a['softcap']}")
    for window in ("left_window_size", "right_window_size"):
        if a.get(window, -1) != -1:
            raise unsupported(f"{window}={a[window]} (a local attention window)")
    if a.get("softmax_precision") not in (None, ONNX_TYPE_OF.get(q.dtype)):
        raise unsupported(f"softmax_precision={a['softmax_precision']} on {q.dtype} inputs")
    if s.num_outputs > 3 or any(r is not None for r in rest):
        raise unsupported("the qk_matmul_output output or nonpad_kv_seqlen")
    flat = q.dim() == 3
    if flat:
        q_heads, kv_heads = a.get("q_num_heads"), a.get("kv_num_heads")
        if not q_heads or not kv_heads:
            raise unsupported("3-d inputs and no q_num_heads/kv_num_heads")
        q, k, v = (t.reshape(t.shape[0], t.shape[1], n, -1).transpose(1, 2)
                   for t, n in ((q, q_heads), (k, kv_heads), (v, kv_heads)))
    if past_key is not None:
        k, v = torch.cat([past_key, k], dim=2), torch.cat([past_value, v], dim=2)
    total, q_len = k.shape[2], q.shape[2]
    if mask is not None and mask.shape[-1] < total:
        fill = False if mask.dtype == torch.bool else float("-inf")
        mask = F.pad(mask, (0, total - mask.shape[-1]), value=fill)
    causal = bool(a.get("is_causal", 0))
    past_len = 0 if past_key is None else past_key.shape[2]
    if causal and (mask is not None or past_len):
        # torch takes a mask or is_causal, and is_causal cannot shift the frontier; the spec's
        # query i sees the keys up to past length + i, so causality goes into the mask
        allowed = torch.ones(q_len, total, dtype=torch.bool).tril(past_len)
        if mask is None:
            mask = allowed
        elif mask.dtype == torch.bool:
            mask = mask & allowed
        else:
            mask = mask.masked_fill(~allowed, float("-inf"))
        causal = False
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=a.get("scale"),
                                       enable_gqa=q.shape[1] != k.shape[1])
    if flat:
        y = y.transpose(1, 2).reshape(y.shape[0], q_len, -1)
    return y if s.num_outputs <= 1 else (y, k, v)[:s.num_outputs]


# -- attention -------------------------------------------------------------------------------------------
_ATTENTION = ("is_causal", "kv_num_heads", "q_num_heads", "scale", "softcap", "left_window_size", "right_window_size",
              "softmax_precision", "qk_matmul_output_mode")

register("Attention", _attention, attributes=_ATTENTION, outputs=3)
