"""ONNX import: an .onnx file -> a torch module that torch.export captures into the same IR.

Each ONNX node is run by a torch function. Values known at trace time (initializers of
integer type, Constant nodes, Shape of a static tensor, and anything computed only from
those) stay numpy arrays, so shape arithmetic folds away and Reshape/Slice/Expand get
static arguments. An op outside the table raises UnsupportedOpError naming node and op.
Static shapes only: the example inputs fix every dimension.
"""
from __future__ import annotations

import os
import re
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import CaptureError, UnsupportedOpError


def _attrs(node) -> dict[str, Any]:
    from onnx import helper, numpy_helper
    out = {}
    for a in node.attribute:
        value = helper.get_attribute_value(a)
        if a.type == a.TENSOR:
            value = numpy_helper.to_array(value)
        elif isinstance(value, bytes):
            value = value.decode()
        out[a.name] = value
    return out


def _torch_dtype(onnx_type: int) -> torch.dtype:
    from onnx import helper
    return torch.from_numpy(np.zeros(0, helper.tensor_dtype_to_np_dtype(onnx_type))).dtype


_ONNX_TYPE_OF = {torch.float32: 1, torch.float16: 10, torch.float64: 11, torch.bfloat16: 16}


class _Static:
    """Helpers that demand trace-time constants for shape-like inputs."""

    def __init__(self, node_desc: str, num_outputs: int, opset: int = 0):
        self.node_desc = node_desc
        self.num_outputs = num_outputs
        self.opset = opset
        self.static_arrays: dict[int, np.ndarray] = {}

    def _known(self, value, what: str) -> np.ndarray:
        value = self.static_arrays.get(id(value), value)
        if isinstance(value, torch.Tensor):
            raise UnsupportedOpError(f"{self.node_desc}: input '{what}' must be a constant known at import "
                                     "time (data-dependent shapes are not supported)")
        return np.asarray(value).reshape(-1)

    def ints(self, value, what: str) -> list[int]:
        return [] if value is None else [int(v) for v in self._known(value, what)]

    def floats(self, value, what: str) -> list[float]:
        return [] if value is None else [float(v) for v in self._known(value, what)]


def _reduce(fn):
    def op(s, a, x, axes=None):
        axes = s.ints(axes, "axes") if axes is not None else a.get("axes")
        keep = bool(a.get("keepdims", 1))
        if not axes:
            if a.get("noop_with_empty_axes", 0):
                return x
            axes = list(range(x.dim()))
        return fn(x, dim=axes, keepdim=keep)
    return op


def _slice(s, a, x, starts=None, ends=None, axes=None, steps=None):
    if "starts" in a:                                    # opset < 10: attributes instead of inputs
        starts, ends, axes = a["starts"], a["ends"], a.get("axes")
    else:
        starts, ends, axes = s.ints(starts, "starts"), s.ints(ends, "ends"), s.ints(axes, "axes")
    axes = [ax % x.dim() for ax in axes] or list(range(len(starts)))
    steps = s.ints(steps, "steps") or [1] * len(starts)
    index = [slice(None)] * x.dim()
    for st, en, ax, sp in zip(starts, ends, axes, steps):
        if sp < 0:
            raise UnsupportedOpError(f"{s.node_desc}: negative Slice steps are not supported")
        dim = x.shape[ax]
        st = max(0, min(dim, st + dim if st < 0 else st))
        en = max(0, min(dim, en + dim if en < 0 else en))
        index[ax] = slice(st, en, sp)
    return x[tuple(index)]


def _reshape(s, a, x, shape=None):
    if shape is None:
        raise UnsupportedOpError(f"{s.node_desc}: Reshape with a 'shape' attribute (opset < 5) is not supported")
    dims = s.ints(shape, "shape")
    if not a.get("allowzero", 0):
        dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    return x.reshape(dims)


def _split(s, a, x, split=None):
    axis = a.get("axis", 0)
    sizes = s.ints(split, "split") if split is not None else a.get("split")
    if not sizes:
        n = a.get("num_outputs") or s.num_outputs
        sizes = [-(-x.shape[axis] // n)] * n
        sizes[-1] = x.shape[axis] - sum(sizes[:-1])
    return tuple(torch.split(x, list(sizes), dim=axis))


def _gemm(s, a, x, w, c=None):
    x = x.t() if a.get("transA", 0) else x
    w = w.t() if a.get("transB", 0) else w
    y = a.get("alpha", 1.0) * (x @ w)
    return y if c is None else y + a.get("beta", 1.0) * c


def _spatial_pads(s, a, x, kernel, strides, dilations) -> list[int]:
    """The begin..., end... pads of a conv or pool, from `pads` or from `auto_pad`."""
    nd = len(kernel)
    auto = a.get("auto_pad", "NOTSET")
    if auto == "NOTSET":
        return list(a.get("pads", [0] * 2 * nd))
    if auto == "VALID":
        return [0] * 2 * nd
    if auto not in ("SAME_UPPER", "SAME_LOWER"):
        raise UnsupportedOpError(f"{s.node_desc}: auto_pad={auto} is not supported")
    pads = [0] * 2 * nd
    for i in range(nd):
        size = x.shape[2 + i]
        out = -(-size // strides[i])
        total = max((out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - size, 0)
        small, big = total // 2, total - total // 2
        pads[i], pads[i + nd] = (small, big) if auto == "SAME_UPPER" else (big, small)
    return pads


def _flat_pads(pads: list[int]) -> list[int]:
    """ONNX begin..., end... pads as F.pad's last-dim-first (begin, end) pairs."""
    nd = len(pads) // 2
    return [p for i in reversed(range(nd)) for p in (pads[i], pads[i + nd])]


def _conv(s, a, x, w, b=None):
    nd = w.dim() - 2
    strides, dilations = a.get("strides", [1] * nd), a.get("dilations", [1] * nd)
    pads = _spatial_pads(s, a, x, list(w.shape[2:]), strides, dilations)
    if pads[:nd] != pads[nd:]:
        x = F.pad(x, _flat_pads(pads))
        pads = [0] * 2 * nd
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[nd]
    return conv(x, w, b, strides, pads[:nd], dilations, a.get("group", 1))


def _pool(kind):
    """MaxPool / AveragePool. Pads torch cannot take (asymmetric, or over half the kernel) are
    applied explicitly: -inf for max; for average, a window sum divided by a count of the
    cells the spec counts (input cells, plus pad cells when count_include_pad)."""
    def op(s, a, x):
        nd = x.dim() - 2
        kernel, strides = list(a["kernel_shape"]), list(a.get("strides", [1] * nd))
        dilations = list(a.get("dilations", [1] * nd))
        pads = _spatial_pads(s, a, x, kernel, strides, dilations)
        ceil = bool(a.get("ceil_mode", 0))
        if a.get("auto_pad", "NOTSET") in ("SAME_UPPER", "SAME_LOWER"):
            ceil = False                          # the SAME pads make the floor size the spec's ceil(in / stride)
        native = pads[:nd] == pads[nd:] and all(2 * p <= k for p, k in zip(pads[:nd], kernel))
        if kind == "max":
            if s.num_outputs > 1 and (not native or a.get("storage_order", 0)):
                raise UnsupportedOpError(f"{s.node_desc}: MaxPool's Indices output with "
                                         + ("storage_order=1" if a.get("storage_order", 0) else f"pads {pads}")
                                         + " is not supported")
            if not native:
                low = float("-inf") if x.is_floating_point() else torch.iinfo(x.dtype).min
                x, pads = F.pad(x, _flat_pads(pads), value=low), [0] * 2 * nd
            pool = getattr(F, f"max_pool{nd}d")
            if s.num_outputs == 1:
                return pool(x, kernel, strides, pads[:nd], dilations, ceil)
            y, index = pool(x, kernel, strides, pads[:nd], dilations, ceil, return_indices=True)
            plane = int(np.prod(x.shape[2:]))
            offsets = torch.arange(x.shape[0] * x.shape[1]).reshape(x.shape[0], x.shape[1], *[1] * nd) * plane
            return y, index + offsets
        if dilations != [1] * nd:
            raise UnsupportedOpError(f"{s.node_desc}: AveragePool with dilations {dilations} is not supported")
        include_pad = bool(a.get("count_include_pad", 0))
        if native:
            return getattr(F, f"avg_pool{nd}d")(x, kernel, strides, pads[:nd], ceil, include_pad)
        squeeze = nd == 1                          # divisor_override exists for 2-d and 3-d pooling
        if squeeze:
            x, kernel, strides, pads = x.unsqueeze(-1), kernel + [1], strides + [1], [pads[0], 0, pads[1], 0]
        pool = getattr(F, f"avg_pool{len(kernel)}d")
        window_sum = pool(F.pad(x, _flat_pads(pads)), kernel, strides, 0, ceil, False, divisor_override=1)
        counted = F.pad(torch.ones_like(x[:1, :1]), _flat_pads(pads), value=1.0 if include_pad else 0.0)
        y = window_sum / pool(counted, kernel, strides, 0, ceil, False, divisor_override=1)
        return y.squeeze(-1) if squeeze else y
    return op


def _conv_transpose(s, a, x, w, b=None):
    nd = w.dim() - 2
    pads = a.get("pads", [0] * 2 * nd)
    if a.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        raise UnsupportedOpError(f"{s.node_desc}: ConvTranspose auto_pad={a['auto_pad']} is not supported")
    if a.get("output_shape") is not None:
        raise UnsupportedOpError(f"{s.node_desc}: ConvTranspose with output_shape is not supported (give pads and "
                                 "output_padding)")
    if pads[:nd] != pads[nd:]:
        raise UnsupportedOpError(f"{s.node_desc}: ConvTranspose with asymmetric pads {pads} is not supported")
    conv = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[nd]
    return conv(x, w, b, a.get("strides", [1] * nd), pads[:nd], a.get("output_padding", [0] * nd),
                a.get("group", 1), a.get("dilations", [1] * nd))


_PAD_MODES = {"constant": "constant", "reflect": "reflect", "edge": "replicate", "wrap": "circular"}


def _pad(s, a, x, pads=None, value=None, axes=None):
    mode = a.get("mode", "constant")
    if mode not in _PAD_MODES:
        raise UnsupportedOpError(f"{s.node_desc}: Pad mode={mode} is not supported")
    if "pads" in a:                                      # opset < 11: attributes instead of inputs
        widths, value = list(a["pads"]), np.asarray([a.get("value", 0.0)], np.float32)
    else:
        widths = s.ints(pads, "pads")
    axes = [ax % x.dim() for ax in s.ints(axes, "axes")] or list(range(x.dim()))
    begin, end = dict(zip(axes, widths[:len(axes)])), dict(zip(axes, widths[len(axes):]))
    padded = [ax for ax in axes if begin[ax] or end[ax]]
    if mode != "constant" and (x.dim() not in (3, 4, 5) or min(padded, default=2) < 2):
        raise UnsupportedOpError(f"{s.node_desc}: Pad mode={mode} pads only the spatial dims of a 3-d to 5-d "
                                 f"input (here dims {padded} of {x.dim()})")
    first = 2 if mode != "constant" else min(padded, default=x.dim() - 1)   # torch's non-constant pads: all spatial
    flat = [p for ax in reversed(range(first, x.dim())) for p in (begin.get(ax, 0), end.get(ax, 0))]
    if mode != "constant":
        return F.pad(x, flat, mode=_PAD_MODES[mode])
    fill = s.floats(value, "constant_value") if value is not None else [0.0]
    return F.pad(x, flat, value=fill[0] if fill else 0.0)


def _instance_norm(s, a, x, scale, bias):
    return F.instance_norm(x, weight=scale, bias=bias, eps=a.get("epsilon", 1e-5))


_INTERPOLATE = {("linear", 1): "linear", ("linear", 2): "bilinear", ("linear", 3): "trilinear",
                ("cubic", 2): "bicubic"}


def _resize(s, a, x, roi=None, scales=None, sizes=None):
    """ONNX Resize as F.interpolate, for the settings that have an exact torch equivalent;
    anything else names the attribute that has none."""
    def unsupported(what: str):
        return UnsupportedOpError(f"{s.node_desc}: Resize with {what} is not supported")

    if s.opset < 11:
        raise unsupported(f"opset {s.opset} (scales as the second input)")
    nd = x.dim() - 2
    mode = a.get("mode", "nearest")
    transform = a.get("coordinate_transformation_mode", "half_pixel")
    for key, default in (("antialias", 0), ("exclude_outside", 0), ("keep_aspect_ratio_policy", "stretch")):
        if a.get(key, default) != default:
            raise unsupported(f"{key}={a[key]}")
    if a.get("axes") is not None and sorted(int(v) % x.dim() for v in a["axes"]) != list(range(2, x.dim())):
        raise unsupported(f"axes={a['axes']} (only all spatial axes)")
    if nd < 1:
        raise unsupported(f"a {x.dim()}-d input")
    size = s.ints(sizes, "sizes")
    factors = s.floats(scales, "scales")
    for given, what in ((size, "sizes"), (factors, "scales")):
        if given and len(given) not in (nd, x.dim()):
            raise unsupported(f"{len(given)} {what} for a {x.dim()}-d input")
    if size:
        if len(size) == x.dim():
            if size[:2] != list(x.shape[:2]):
                raise unsupported(f"sizes {size} that change the batch or channel dims")
            size = size[2:]
        out = list(size)
        scale_inv = [i / o for i, o in zip(x.shape[2:], out)]
        kwargs = {"size": out}
    elif factors:
        if len(factors) == x.dim():
            if factors[:2] != [1.0, 1.0]:
                raise unsupported(f"scales {factors} that change the batch or channel dims")
            factors = factors[2:]
        out = [int(np.floor(i * f)) for i, f in zip(x.shape[2:], factors)]
        scale_inv = [1 / f for f in factors]
        kwargs = {"scale_factor": factors, "recompute_scale_factor": False}
    else:
        raise unsupported("neither scales nor sizes")
    if mode == "nearest":
        rule = a.get("nearest_mode", "round_prefer_floor")
        if transform == "asymmetric" and rule == "floor":
            return F.interpolate(x, mode="nearest", **kwargs)
        if transform == "half_pixel" and rule in ("round_prefer_ceil", "round_prefer_floor"):
            # torch's nearest-exact rounds halves up; with round_prefer_floor that is exact
            # unless some output pixel lands exactly halfway between two input pixels
            ties = [np.any(np.isclose(np.modf((np.arange(o) + 0.5) * r)[0], 0.0)) for o, r in zip(out, scale_inv)]
            if rule == "round_prefer_ceil" or not any(ties):
                return F.interpolate(x, mode="nearest-exact", **kwargs)
        raise unsupported(f"mode=nearest, coordinate_transformation_mode={transform}, nearest_mode={rule}")
    if (mode, nd) not in _INTERPOLATE:
        raise unsupported(f"mode={mode} on a {x.dim()}-d input")
    if mode == "cubic" and a.get("cubic_coeff_a", -0.75) != -0.75:
        raise unsupported(f"cubic_coeff_a={a['cubic_coeff_a']} (torch's bicubic uses -0.75)")
    if transform == "align_corners":
        align = True
    elif transform == "half_pixel" or (transform == "pytorch_half_pixel" and min(out) > 1):
        align = False
    else:
        raise unsupported(f"mode={mode}, coordinate_transformation_mode={transform}"
                          + (" and an output size of 1" if transform == "pytorch_half_pixel" else ""))
    return F.interpolate(x, mode=_INTERPOLATE[(mode, nd)], align_corners=align, **kwargs)


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
    if a.get("softmax_precision") not in (None, _ONNX_TYPE_OF.get(q.dtype)):
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


def _cumsum(s, a, x, axis):
    (dim,) = s.ints(axis, "axis")
    if a.get("reverse", 0):
        x = x.flip(dim)
    y = torch.cumsum(x, dim)
    if a.get("exclusive", 0):
        y = y - x
    return y.flip(dim) if a.get("reverse", 0) else y


def _stash_type(s, a, x) -> None:
    if a.get("stash_type", 1) != 1:
        raise UnsupportedOpError(f"{s.node_desc}: stash_type={a['stash_type']} is not supported (only 1, float)")


def _layer_norm(s, a, x, scale, bias=None):
    _stash_type(s, a, x)
    axis = a.get("axis", -1) % x.dim()
    eps = a.get("epsilon", 1e-5)
    y = F.layer_norm(x, x.shape[axis:], scale, bias, eps)
    if s.num_outputs == 1:
        return y
    dims = list(range(axis, x.dim()))
    wide = x.float()
    mean = wide.mean(dims, keepdim=True)
    inv_std = torch.rsqrt(((wide - mean) ** 2).mean(dims, keepdim=True) + eps)
    return (y, mean, inv_std)[:s.num_outputs]


def _rms_norm(s, a, x, scale, *rest):
    _stash_type(s, a, x)
    if any(r is not None for r in rest):
        raise UnsupportedOpError(f"{s.node_desc}: {len(rest)} inputs after the scale are not supported")
    axis = a.get("axis", -1) % x.dim()
    dims = list(range(axis, x.dim()))
    y = x * torch.rsqrt(x.pow(2).mean(dims, keepdim=True) + a.get("epsilon", 1e-5))
    return y * scale


def _cast(s, a, x):
    return x.to(_torch_dtype(a["to"]))


def _range(s, a, start, limit, delta):
    def scalar(v, what):
        v = s.static_arrays.get(id(v), v)
        if isinstance(v, torch.Tensor):
            raise UnsupportedOpError(f"{s.node_desc}: Range with a '{what}' computed from the inputs is not supported "
                                     "(it must be a constant)")
        return np.asarray(v).item()
    return torch.arange(scalar(start, "start"), scalar(limit, "limit"), scalar(delta, "delta"),
                        dtype=torch.from_numpy(np.zeros(0, np.asarray(s.static_arrays.get(id(start), 0)).dtype)).dtype)


def _constant_of_shape(s, a, shape):
    value = a.get("value", np.zeros(1, np.float32))
    return torch.full(s.ints(shape, "shape"), value.reshape(-1)[0].item(),
                      dtype=torch.from_numpy(np.asarray(value)).dtype)


def _softmax(fn):
    def op(s, a, x):
        if s.opset >= 13:
            return fn(x, dim=a.get("axis", -1))
        axis = a.get("axis", 1) % max(x.dim(), 1)     # before opset 13: over all dims from axis on
        return fn(x.reshape(*x.shape[:axis], -1), dim=-1).reshape(x.shape)
    return op


def _dropout(s, a, x, ratio=None, training_mode=None):
    if training_mode is not None and any(s.ints(training_mode, "training_mode")):
        raise UnsupportedOpError(f"{s.node_desc}: Dropout with training_mode=true is not supported (inference only)")
    if s.num_outputs == 1:
        return x
    return x, torch.ones(x.shape, dtype=torch.bool)


def _pow(s, a, x, y):
    out = torch.pow(x, y)
    return out if out.dtype == x.dtype else out.to(x.dtype)   # the spec: the base's type


def _normalized_indices(index: torch.Tensor, size: int) -> torch.Tensor:
    """ONNX index inputs may count from the end (-1 is the last)."""
    return torch.where(index < 0, index + size, index)


def _gather(s, a, x, index):
    axis = a.get("axis", 0) % x.dim()
    flat = _normalized_indices(index.reshape(-1), x.shape[axis])
    return torch.index_select(x, axis, flat).reshape(x.shape[:axis] + index.shape + x.shape[axis + 1:])


def _gather_elements(s, a, x, index):
    axis = a.get("axis", 0) % x.dim()
    return torch.gather(x, axis, _normalized_indices(index, x.shape[axis]))


def _squeeze(s, a, x, axes=None):
    axes = s.ints(axes, "axes") if axes is not None else a.get("axes")
    return x.squeeze(tuple(axes)) if axes else x.squeeze()


def _unsqueeze(s, a, x, axes=None):
    axes = s.ints(axes, "axes") if axes is not None else a["axes"]
    for ax in sorted(ax % (x.dim() + len(axes)) for ax in axes):
        x = x.unsqueeze(ax)
    return x


def _clip(s, a, x, lo=None, hi=None):
    lo = a.get("min") if lo is None else lo
    hi = a.get("max") if hi is None else hi
    return x if lo is None and hi is None else torch.clamp(x, lo, hi)


def _trilu(s, a, x, k=None):
    k = s.ints(k, "k")[0] if k is not None else 0
    return torch.triu(x, k) if a.get("upper", 1) else torch.tril(x, k)


def _batch_norm(s, a, x, scale, bias, mean, var):
    if a.get("training_mode", 0):
        raise UnsupportedOpError(f"{s.node_desc}: BatchNormalization with training_mode=1 is not supported "
                                 "(inference only)")
    return F.batch_norm(x, mean, var, scale, bias, False, 0.0, a.get("epsilon", 1e-5))


def _gelu(s, a, x):
    return F.gelu(x, approximate=a.get("approximate", "none"))


OPS: dict[str, Callable] = {
    "Add": lambda s, a, x, y: x + y, "Sub": lambda s, a, x, y: x - y, "Mul": lambda s, a, x, y: x * y,
    "Div": lambda s, a, x, y: torch.div(x, y, rounding_mode="trunc") if not x.is_floating_point() else x / y,
    "Pow": _pow, "Sqrt": lambda s, a, x: torch.sqrt(x),
    "Reciprocal": lambda s, a, x: torch.reciprocal(x), "Neg": lambda s, a, x: -x,
    "Abs": lambda s, a, x: torch.abs(x), "Exp": lambda s, a, x: torch.exp(x), "Log": lambda s, a, x: torch.log(x),
    "Erf": lambda s, a, x: torch.erf(x), "Tanh": lambda s, a, x: torch.tanh(x), "Sin": lambda s, a, x: torch.sin(x),
    "Cos": lambda s, a, x: torch.cos(x), "Sigmoid": lambda s, a, x: torch.sigmoid(x),
    "Relu": lambda s, a, x: torch.relu(x), "LeakyRelu": lambda s, a, x: F.leaky_relu(x, a.get("alpha", 0.01)),
    "Gelu": _gelu, "Softmax": _softmax(torch.softmax), "LogSoftmax": _softmax(torch.log_softmax),
    "MatMul": lambda s, a, x, y: torch.matmul(x, y), "Gemm": _gemm, "Conv": _conv,
    "BatchNormalization": _batch_norm, "MaxPool": _pool("max"), "AveragePool": _pool("avg"),
    "GlobalAveragePool": lambda s, a, x: x.mean(tuple(range(2, x.dim())), keepdim=True),
    "Flatten": lambda s, a, x: x.reshape(int(np.prod(x.shape[: a.get("axis", 1)])), -1),
    "Reshape": _reshape, "Transpose": lambda s, a, x: x.permute(a.get("perm", list(range(x.dim()))[::-1])),
    "Concat": lambda s, a, *xs: torch.cat(xs, dim=a["axis"]), "Split": _split, "Slice": _slice,
    "Gather": _gather, "GatherElements": _gather_elements,
    "GatherND": lambda s, a, x, i: _gather_nd(s, a, x, i),
    "Unsqueeze": _unsqueeze, "Squeeze": _squeeze,
    "Shape": lambda s, a, x: torch.tensor(list(x.shape)[a.get("start", 0): a.get("end")], dtype=torch.int64),
    "Cast": _cast, "CastLike": lambda s, a, x, y: x.to(y.dtype), "Identity": lambda s, a, x: x,
    "Dropout": _dropout, "Where": lambda s, a, c, x, y: torch.where(c, x, y),
    "Equal": lambda s, a, x, y: x == y, "Less": lambda s, a, x, y: x < y, "Greater": lambda s, a, x, y: x > y,
    "LessOrEqual": lambda s, a, x, y: x <= y, "GreaterOrEqual": lambda s, a, x, y: x >= y,
    "Not": lambda s, a, x: ~x, "And": lambda s, a, x, y: x & y, "Or": lambda s, a, x, y: x | y,
    "IsNaN": lambda s, a, x: torch.isnan(x), "Max": lambda s, a, *xs: _fold(torch.maximum, xs),
    "Min": lambda s, a, *xs: _fold(torch.minimum, xs), "Clip": _clip, "Trilu": _trilu,
    "Expand": lambda s, a, x, shape: x.expand(torch.broadcast_shapes(x.shape, tuple(s.ints(shape, "shape")))),
    "Range": _range, "ConstantOfShape": _constant_of_shape, "CumSum": _cumsum,
    "ReduceMean": _reduce(torch.mean), "ReduceSum": _reduce(torch.sum),
    "ReduceMax": _reduce(lambda x, dim, keepdim: torch.amax(x, dim, keepdim)),
    "ReduceMin": _reduce(lambda x, dim, keepdim: torch.amin(x, dim, keepdim)),
    "HardSwish": lambda s, a, x: F.hardswish(x),
    "HardSigmoid": lambda s, a, x: torch.clamp(a.get("alpha", 0.2) * x + a.get("beta", 0.5), 0, 1),
    "Softplus": lambda s, a, x: F.softplus(x), "Elu": lambda s, a, x: F.elu(x, a.get("alpha", 1.0)),
    "PRelu": lambda s, a, x, slope: torch.where(x < 0, x * slope, x),
    "ConvTranspose": _conv_transpose, "Pad": _pad, "InstanceNormalization": _instance_norm,
    "_linear": lambda s, a, x, w, b=None: F.linear(x, w, b),      # MatMul/Gemm by a constant (OnnxModule)
    "Attention": _attention, "Resize": _resize, "LayerNormalization": _layer_norm, "RMSNormalization": _rms_norm,
    "SimplifiedLayerNormalization": _rms_norm,
}


_POOL = ("auto_pad", "ceil_mode", "dilations", "kernel_shape", "pads", "strides")
_CONV = ("auto_pad", "dilations", "group", "kernel_shape", "pads", "strides")
_REDUCE = ("axes", "keepdims", "noop_with_empty_axes")
_NORM = ("axis", "epsilon", "stash_type")
_CAST = ("saturate", "round_mode")       # both act on float8 / float4 targets only, which raise

# The attributes each translation reads, over every opset it accepts. Any other attribute on
# a node raises UnsupportedOpError: nothing the importer does not implement is ignored.
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "Attention": ("is_causal", "kv_num_heads", "q_num_heads", "scale", "softcap", "left_window_size",
                  "right_window_size", "softmax_precision", "qk_matmul_output_mode"),
    "AveragePool": _POOL + ("count_include_pad",), "MaxPool": _POOL + ("storage_order",),
    "Conv": _CONV, "ConvTranspose": _CONV + ("output_padding", "output_shape"),
    "BatchNormalization": ("epsilon", "momentum", "training_mode"), "InstanceNormalization": ("epsilon",),
    "LayerNormalization": _NORM, "RMSNormalization": _NORM, "SimplifiedLayerNormalization": _NORM,
    "ReduceMean": _REDUCE, "ReduceSum": _REDUCE, "ReduceMax": _REDUCE, "ReduceMin": _REDUCE,
    "Cast": ("to",) + _CAST, "CastLike": _CAST, "Clip": ("min", "max"), "ConstantOfShape": ("value",),
    "Concat": ("axis",), "Flatten": ("axis",), "Gather": ("axis",), "GatherElements": ("axis",),
    "GatherND": ("batch_dims",), "Softmax": ("axis",), "LogSoftmax": ("axis",), "Transpose": ("perm",),
    "Split": ("axis", "num_outputs", "split"), "Squeeze": ("axes",), "Unsqueeze": ("axes",),
    "Slice": ("starts", "ends", "axes"), "Pad": ("mode", "pads", "value"), "Reshape": ("allowzero",),
    "Shape": ("start", "end"), "CumSum": ("exclusive", "reverse"), "Trilu": ("upper",),
    "Dropout": ("ratio", "seed"), "Gemm": ("alpha", "beta", "transA", "transB"), "Gelu": ("approximate",),
    "LeakyRelu": ("alpha",), "Elu": ("alpha",), "HardSigmoid": ("alpha", "beta"),
    "Resize": ("antialias", "axes", "coordinate_transformation_mode", "cubic_coeff_a", "exclude_outside",
               "extrapolation_value", "keep_aspect_ratio_policy", "mode", "nearest_mode"),
}

# Ops with more outputs than one: the most each translation produces (None: any number).
OUTPUTS: dict[str, int | None] = {"Attention": 3, "Dropout": 2, "LayerNormalization": 3, "MaxPool": 2, "Split": None}

# Element types the importer computes in (torch lacks arithmetic on uint16..uint64; numpy
# has no bfloat16 or float8 for the artifacts' inputs).
ELEMENT_TYPES = ("FLOAT", "DOUBLE", "FLOAT16", "INT8", "INT16", "INT32", "INT64", "UINT8", "BOOL")

# Float inputs that are numbers at import time, not tensors: (op, input positions).
_READ_AT_IMPORT = {"Resize": (1, 2, 3), "Pad": (2,)}


def _check_node(node, attrs: dict[str, Any], desc: str) -> None:
    """Raise UnsupportedOpError for an attribute, an output or a target type the op's
    translation does not implement."""
    known = ATTRIBUTES.get(node.op_type, ())
    for name in attrs:
        if name not in known:
            raise UnsupportedOpError(f"{desc}: attribute '{name}' is not supported")
    most = OUTPUTS.get(node.op_type, 1)
    if most is not None and len(node.output) > most:
        raise UnsupportedOpError(f"{desc}: output #{most} ('{node.output[most]}') is not supported; "
                                 f"the importer computes {most} output{'s' if most > 1 else ''}")
    if node.op_type == "Cast":
        _check_type(attrs["to"], f"{desc}: 'to'")
    if node.op_type == "ConstantOfShape" and "value" in attrs:
        _check_array_type(attrs["value"], f"{desc}: value")


def _check_schema(node, opset: int, desc: str) -> None:
    """The op must exist at the model's opset (ONNX Runtime refuses it otherwise)."""
    import onnx.defs
    if node.domain not in ("", "ai.onnx"):
        return
    newest = onnx.defs.onnx_opset_version()
    if not 1 <= opset <= newest:
        raise CaptureError(f"{desc}: the model imports opset {opset} of the default domain; ONNX defines 1..{newest}")
    try:
        onnx.defs.get_schema(node.op_type, opset, "")
    except onnx.defs.SchemaError:
        raise CaptureError(f"{desc}: {node.op_type} does not exist in opset {opset}") from None


def _check_declared(tensor_type, value: torch.Tensor, what: str, is_phrase: str, has_phrase: str) -> None:
    """`value` must have the element type and fixed dims `tensor_type` declares."""
    want = _torch_dtype(tensor_type.elem_type)
    if value.dtype != want:
        raise CaptureError(f"{what} is declared {str(want).replace('torch.', '')}, "
                           f"{is_phrase} {str(value.dtype).replace('torch.', '')}")
    if tensor_type.HasField("shape"):
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim]
        if len(dims) != value.dim() or any(d is not None and d != s for d, s in zip(dims, value.shape)):
            shown = ["?" if d is None else d for d in dims]
            raise CaptureError(f"{what} is declared with shape {shown}, {has_phrase} {list(value.shape)}")


def _check_outputs(graph, outputs, path: str) -> None:
    """What the graph computed must have the element types and fixed dims it declares."""
    for value, out in zip(graph.output, outputs):
        _check_declared(value.type.tensor_type, out, f"{path}: output '{value.name}'", "the graph computes",
                        "the graph computes")


def _check_type(elem_type: int, what: str) -> None:
    from onnx import TensorProto
    if elem_type not in TensorProto.DataType.values():
        raise UnsupportedOpError(f"{what} has element type {elem_type}, which is not an ONNX type")
    name = TensorProto.DataType.Name(elem_type)
    if name not in ELEMENT_TYPES:
        raise UnsupportedOpError(f"{what} has element type {name}, which graphopt's ONNX importer does not "
                                 f"support (supported: {', '.join(ELEMENT_TYPES)})")


def _check_array_type(array: np.ndarray, what: str) -> None:
    from onnx import helper
    try:
        elem_type = helper.np_dtype_to_tensor_dtype(np.asarray(array).dtype)
    except (KeyError, TypeError, ValueError):
        raise UnsupportedOpError(f"{what} has numpy dtype {np.asarray(array).dtype}, which graphopt's ONNX "
                                 "importer does not support") from None
    _check_type(elem_type, what)


def _check_element_types(graph, source: str) -> None:
    for kind, values in (("input", graph.input), ("output", graph.output), ("value", graph.value_info)):
        for value in values:
            if value.type.HasField("tensor_type"):
                _check_type(value.type.tensor_type.elem_type, f"{source}: {kind} '{value.name}'")
            else:
                raise UnsupportedOpError(f"{source}: {kind} '{value.name}' is a {value.type.WhichOneof('value')}, "
                                         "not a tensor; inputs and outputs other than tensors are not supported")
    for init in graph.initializer:
        _check_type(init.data_type, f"{source}: initializer '{init.name}'")


def _gather_nd(s, a, x, indices):
    if a.get("batch_dims", 0):
        raise UnsupportedOpError(f"{s.node_desc}: GatherND with batch_dims is not supported")
    depth = indices.shape[-1]
    index = tuple(_normalized_indices(indices[..., k], x.shape[k]) for k in range(depth))
    return x[index]


def _fold(fn, xs):
    out = xs[0]
    for x in xs[1:]:
        out = fn(out, x)
    return out


class OnnxModule(torch.nn.Module):
    """Runs an ONNX graph with torch ops; see the module docstring."""

    def __init__(self, model, source: str = "model.onnx"):
        super().__init__()
        from onnx import numpy_helper
        graph = model.graph
        self.source = source
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
        _check_element_types(graph, source)
        self.static: dict[str, np.ndarray] = {}
        self.buffer_of: dict[str, str] = {}
        read_at_import = {n.input[k] for n in graph.node for k in _READ_AT_IMPORT.get(n.op_type, ())
                          if k < len(n.input) and n.input[k]}
        for init in graph.initializer:
            try:
                array = numpy_helper.to_array(init)
            except Exception as exc:
                raise CaptureError(f"{source}: initializer '{init.name}' does not hold the data its dims "
                                   f"{list(init.dims)} say: {_first_line(exc)}") from exc
            if (array.dtype.kind in "iub" or init.name in read_at_import) and array.size <= 64:
                self.static[init.name] = array
            else:
                name = re.sub(r"\W", "_", init.name)
                while hasattr(self, name):
                    name += "_"
                self.register_buffer(name, torch.from_numpy(array.copy()))
                self.buffer_of[init.name] = name
        init_names = {i.name for i in graph.initializer}
        self.input_names = [i.name for i in graph.input if i.name not in init_names]
        self.output_names = [o.name for o in graph.output]
        self.nodes = []
        for index, node in enumerate(graph.node):
            desc = f"ONNX node '{node.name or f'#{index}'}' (op {node.op_type}, domain '{node.domain}')"
            if node.op_type == "Constant":
                self.static[node.output[0]] = self._constant(node)
                _check_array_type(self.static[node.output[0]], f"{desc} in {source}: value")
                continue
            if node.domain not in ("", "ai.onnx", "com.microsoft") or node.op_type not in OPS:
                raise UnsupportedOpError(f"{desc} in {source} is not supported by graphopt's ONNX importer")
            _check_schema(node, self.opset, f"{desc} in {source}")
            attrs = _attrs(node)
            _check_node(node, attrs, f"{desc} in {source}")
            self.nodes.append((desc, node.op_type, list(node.input), list(node.output), attrs))
        self._as_linear_layers()

    def _buffer(self, name: str, rank: int) -> torch.Tensor | None:
        """The floating-point initializer `name` if it has `rank` dims, else None."""
        value = getattr(self, self.buffer_of[name]) if name in self.buffer_of else None
        return value if value is not None and value.is_floating_point() and value.dim() == rank else None

    def _as_linear_layers(self) -> None:
        """MatMul / Gemm by a constant matrix (and an Add of a constant bias right after a
        MatMul) become one linear layer, captured as an nn.Linear would be, so the passes that
        find linear layers (fusion, quantization, head and channel pruning) see them."""
        readers: dict[str, list[int]] = {}
        transposed: dict[str, str] = {}      # Transpose outputs of a constant matrix (a tied LM head) -> it
        for i, (_, op, inputs, outputs, attrs) in enumerate(self.nodes):
            for name in inputs:
                readers.setdefault(name, []).append(i)
            if op == "Transpose" and self._buffer(inputs[0], 2) is not None and attrs.get("perm", [1, 0]) == [1, 0]:
                transposed[outputs[0]] = inputs[0]
        merged = set()
        for i, (desc, op, inputs, outputs, attrs) in enumerate(self.nodes):
            if op == "MatMul" and len(inputs) == 2 and inputs[1] in transposed:
                self.nodes[i] = (desc, "_linear", [inputs[0], transposed[inputs[1]]], outputs, {})   # x @ W.T
                continue
            if op not in ("MatMul", "Gemm") or len(inputs) < 2 or (weight := self._buffer(inputs[1], 2)) is None:
                continue
            bias = None
            if op == "Gemm":
                if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
                    continue
                weight = weight if attrs.get("transB", 0) else weight.t()
                if len(inputs) > 2 and inputs[2]:
                    bias = inputs[2]
                    if (b := self._buffer(bias, 1)) is None or b.numel() != weight.shape[0]:
                        continue
            else:
                weight = weight.t()
                users = readers.get(outputs[0], [])
                if len(users) == 1 and outputs[0] not in self.output_names and self.nodes[users[0]][1] == "Add":
                    add = self.nodes[users[0]]
                    other = [name for name in add[2] if name != outputs[0]]
                    if len(other) == 1 and (b := self._buffer(other[0], 1)) is not None and \
                            b.numel() == weight.shape[0]:
                        bias, outputs = other[0], add[3]
                        merged.add(users[0])
            name = f"{self.buffer_of[inputs[1]]}_linear"
            while hasattr(self, name):
                name += "_"
            self.register_buffer(name, weight.contiguous())
            self.buffer_of[name] = name
            self.nodes[i] = (desc, "_linear", [inputs[0], name] + ([bias] if bias else []), outputs, {})
        self.nodes = [node for i, node in enumerate(self.nodes) if i not in merged]
        used = {name for _, _, inputs, _, _ in self.nodes for name in inputs} | set(self.output_names)
        for onnx_name, attr in list(self.buffer_of.items()):
            if onnx_name not in used:
                delattr(self, attr)
                del self.buffer_of[onnx_name]

    @staticmethod
    def _constant(node) -> np.ndarray:
        attrs = _attrs(node)
        for key in ("value", "value_float", "value_floats", "value_int", "value_ints"):
            if key in attrs:
                value = attrs[key]
                return np.asarray(value, dtype=np.float32 if "float" in key else (np.int64 if "int" in key else None))
        raise UnsupportedOpError(f"Constant node '{node.name}' uses an unsupported attribute")

    def forward(self, *args: torch.Tensor):
        """Run the graph. The first (eager) call also caches every value that does not depend
        on the inputs' values in `self.static`; traced calls then skip those nodes."""
        env: dict[str, Any] = dict(self.static)
        env.update({k: getattr(self, v) for k, v in self.buffer_of.items()})
        env.update(zip(self.input_names, args))
        for desc, op_type, inputs, outputs, attrs in self.nodes:
            if all(not name or name in self.static for name in outputs):
                continue
            values = [env[name] if name else None for name in inputs]
            helper = _Static(desc, len(outputs), self.opset)
            all_static = all(v is None or isinstance(v, np.ndarray) for v in values)
            tensors = []
            for v in values:
                t = torch.from_numpy(np.array(v)) if isinstance(v, np.ndarray) else v
                if isinstance(v, np.ndarray):
                    helper.static_arrays[id(t)] = v
                tensors.append(t)
            try:
                result = OPS[op_type](helper, attrs, *tensors)
            except UnsupportedOpError:
                raise
            except Exception as exc:
                raise CaptureError(f"{desc} failed: {type(exc).__name__}: {str(exc).splitlines()[0]}") from exc
            results = result if isinstance(result, tuple) else (result,)
            for name, value in zip(outputs, results):
                if not name:
                    continue
                if all_static or op_type == "Shape":
                    value = value.detach().numpy().copy()
                    self.static[name] = value
                env[name] = value
        return tuple(torch.from_numpy(np.array(env[n])) if isinstance(env[n], np.ndarray) else env[n]
                     for n in self.output_names)


def _load(path: str, external_data: bool = True):
    import onnx
    if not os.path.isfile(path):
        raise CaptureError(f"ONNX file {path} not found")
    try:
        model = onnx.load(path, load_external_data=external_data)
    except Exception as exc:
        raise CaptureError(f"{path} is not a readable ONNX model: {_first_line(exc)}") from exc
    if not external_data:                   # only the signature is read; the full import checks the model
        return model
    try:
        onnx.checker.check_model(path)
    except Exception as exc:
        # The checker wants a shape on every graph input and output; the spec (and ONNX
        # Runtime) take a tensor type without one, so that alone is no reason to refuse.
        if "Field 'shape' of 'type' is required" not in str(exc):
            raise CaptureError(f"{path} is not a valid ONNX model: {_first_line(exc)}") from exc
    return model


def _first_line(exc: Exception) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def _check_example_inputs(graph, names: list[str], example_inputs, path: str) -> None:
    """Each example input must have its graph input's declared element type and fixed dims."""
    declared = {v.name: v.type.tensor_type for v in graph.input}
    for name, value in zip(names, example_inputs):
        if not isinstance(value, torch.Tensor):
            raise CaptureError(f"{path}: example input '{name}' is a {type(value).__name__}, not a torch tensor")
        _check_declared(declared[name], value, f"{path}: input '{name}'", "the example input is",
                        "the example input has")


def example_inputs_for(path: str | os.PathLike, dims: dict[str, int] | None = None,
                       seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Example inputs for an ONNX file's graph inputs: fixed dims from the file, named (or
    unnamed) dims from `dims` (name -> size). Float inputs are N(0, 1); integer inputs are
    0..99 (token ids every vocabulary has), or all ones when named like a mask."""
    path = os.fspath(path)
    graph = _load(path, external_data=False).graph
    init_names = {i.name for i in graph.initializer}
    generator = torch.Generator().manual_seed(seed)
    dims = dims or {}
    inputs = []
    for value in graph.input:
        if value.name in init_names:
            continue
        tensor_type = value.type.tensor_type
        shape = []
        for k, d in enumerate(tensor_type.shape.dim):
            if d.HasField("dim_value"):
                shape.append(d.dim_value)
            elif d.dim_param in dims:
                shape.append(int(dims[d.dim_param]))
            else:
                raise CaptureError(f"{path}: input '{value.name}' dim {k} is "
                                   f"{repr(d.dim_param) if d.dim_param else 'unnamed'}: give its size "
                                   f"(--dim {d.dim_param or 'NAME'}=SIZE)")
        dtype = _torch_dtype(tensor_type.elem_type)
        if dtype.is_floating_point:
            inputs.append(torch.randn(shape, generator=generator).to(dtype))
        elif "mask" in value.name.lower():
            inputs.append(torch.ones(shape, dtype=dtype))
        else:
            inputs.append(torch.randint(0, 100, shape, generator=generator).to(dtype))
    return tuple(inputs)


def import_onnx(path: str | os.PathLike, example_inputs):
    """Load an .onnx file as an OnnxModule; returns (module, example inputs as a tuple)."""
    path = os.fspath(path)
    model = _load(path)
    module = OnnxModule(model, os.path.basename(path))
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if isinstance(example_inputs, dict):
        example_inputs = tuple(example_inputs[n] for n in module.input_names)
    example_inputs = tuple(example_inputs)
    if len(example_inputs) != len(module.input_names):
        raise CaptureError(f"{path} takes {len(module.input_names)} inputs ({', '.join(module.input_names)}), "
                           f"got {len(example_inputs)} example inputs")
    _check_example_inputs(model.graph, module.input_names, example_inputs, path)
    with torch.no_grad():
        outputs = module(*example_inputs)  # eager pass: caches the input-independent (shape) values
    _check_outputs(model.graph, outputs, path)
    return module, example_inputs
