"""ONNX translations: shapes, views, indexing, padding, reductions and constant generators.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ...errors import UnsupportedOpError
from .registry import register


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


def _cumsum(s, a, x, axis):
    (dim,) = s.ints(axis, "axis")
    if a.get("reverse", 0):
        x = x.flip(dim)
    y = torch.cumsum(x, dim)
    if a.get("exclusive", 0):
        y = y - x
    return y.flip(dim) if a.get("reverse", 0) else y


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


def _trilu(s, a, x, k=None):
    k = s.ints(k, "k")[0] if k is not None else 0
    return torch.triu(x, k) if a.get("upper", 1) else torch.tril(x, k)


_REDUCE = ("axes", "keepdims", "noop_with_empty_axes")


def _gather_nd(s, a, x, indices):
    if a.get("batch_dims", 0):
        raise UnsupportedOpError(f"{s.node_desc}: GatherND with batch_dims is not supported")
    depth = indices.shape[-1]
    index = tuple(_normalized_indices(indices[..., k], x.shape[k]) for k in range(depth))
    return x[index]


def _shape(s, a, x):
    return torch.tensor(list(x.shape)[a.get("start", 0): a.get("end")], dtype=torch.int64)


# -- shapes and views ------------------------------------------------------------------------------------
register("Shape", _shape, attributes=("start", "end"))
register("Reshape", _reshape, attributes=("allowzero",))
register("Flatten", lambda s, a, x: x.reshape(int(np.prod(x.shape[: a.get("axis", 1)])), -1), attributes=("axis",))
register("Transpose", lambda s, a, x: x.permute(a.get("perm", list(range(x.dim()))[::-1])), attributes=("perm",))
register("Squeeze", _squeeze, attributes=("axes",))
register("Unsqueeze", _unsqueeze, attributes=("axes",))
register("Expand", lambda s, a, x, shape: x.expand(torch.broadcast_shapes(x.shape, tuple(s.ints(shape, "shape")))))
register("Concat", lambda s, a, *xs: torch.cat(xs, dim=a["axis"]), attributes=("axis",))
register("Split", _split, attributes=("axis", "num_outputs", "split"), outputs=None)
register("Slice", _slice, attributes=("starts", "ends", "axes"))
register("Trilu", _trilu, attributes=("upper",))

# -- indexing --------------------------------------------------------------------------------------------
register("Gather", _gather, attributes=("axis",))
register("GatherElements", _gather_elements, attributes=("axis",))
register("GatherND", lambda s, a, x, i: _gather_nd(s, a, x, i), attributes=("batch_dims",))

# -- padding and generators ------------------------------------------------------------------------------
register("Pad", _pad, attributes=("mode", "pads", "value"))
register("Range", _range)
register("ConstantOfShape", _constant_of_shape, attributes=("value",))
register("CumSum", _cumsum, attributes=("exclusive", "reverse"))

# -- reductions ------------------------------------------------------------------------------------------
register("ReduceMean", _reduce(torch.mean), attributes=_REDUCE)
register("ReduceSum", _reduce(torch.sum), attributes=_REDUCE)
register("ReduceMax", _reduce(lambda x, dim, keepdim: torch.amax(x, dim, keepdim)), attributes=_REDUCE)
register("ReduceMin", _reduce(lambda x, dim, keepdim: torch.amin(x, dim, keepdim)), attributes=_REDUCE)
