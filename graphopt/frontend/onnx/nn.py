"""ONNX translations: linear layers, convolutions, pooling, normalizations, softmax, dropout and resize.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ...errors import UnsupportedOpError
from .registry import register


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


def _batch_norm(s, a, x, scale, bias, mean, var):
    if a.get("training_mode", 0):
        raise UnsupportedOpError(f"{s.node_desc}: BatchNormalization with training_mode=1 is not supported "
                                 "(inference only)")
    return F.batch_norm(x, mean, var, scale, bias, False, 0.0, a.get("epsilon", 1e-5))


_POOL = ("auto_pad", "ceil_mode", "dilations", "kernel_shape", "pads", "strides")


_CONV = ("auto_pad", "dilations", "group", "kernel_shape", "pads", "strides")


_NORM = ("axis", "epsilon", "stash_type")
_RESIZE = ("antialias", "axes", "coordinate_transformation_mode", "cubic_coeff_a", "exclude_outside",
           "extrapolation_value", "keep_aspect_ratio_policy", "mode", "nearest_mode")


# -- linear layers ---------------------------------------------------------------------------------------
register("MatMul", lambda s, a, x, y: torch.matmul(x, y))
register("Gemm", _gemm, attributes=("alpha", "beta", "transA", "transB"))
register("_linear", lambda s, a, x, w, b=None: F.linear(x, w, b))  # MatMul/Gemm by a constant (OnnxModule)

# -- convolutions and pooling ----------------------------------------------------------------------------
register("Conv", _conv, attributes=_CONV)
register("ConvTranspose", _conv_transpose, attributes=_CONV + ("output_padding", "output_shape"))
register("MaxPool", _pool("max"), attributes=_POOL + ("storage_order",), outputs=2)
register("AveragePool", _pool("avg"), attributes=_POOL + ("count_include_pad",))
register("GlobalAveragePool", lambda s, a, x: x.mean(tuple(range(2, x.dim())), keepdim=True))

# -- normalizations --------------------------------------------------------------------------------------
register("BatchNormalization", _batch_norm, attributes=("epsilon", "momentum", "training_mode"))
register("InstanceNormalization", _instance_norm, attributes=("epsilon",))
register("LayerNormalization", _layer_norm, attributes=_NORM, outputs=3)
register("RMSNormalization", _rms_norm, attributes=_NORM)
register("SimplifiedLayerNormalization", _rms_norm, attributes=_NORM)

# -- softmax, dropout, resize ----------------------------------------------------------------------------
register("Softmax", _softmax(torch.softmax), attributes=("axis",))
register("LogSoftmax", _softmax(torch.log_softmax), attributes=("axis",))
register("Dropout", _dropout, attributes=("ratio", "seed"), outputs=2)
register("Resize", _resize, attributes=_RESIZE)
