"""ONNX translations: arithmetic, comparisons, logic, activations and casts.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .registry import register, torch_dtype


def _cast(s, a, x):
    return x.to(torch_dtype(a["to"]))


def _pow(s, a, x, y):
    out = torch.pow(x, y)
    return out if out.dtype == x.dtype else out.to(x.dtype)   # the spec: the base's type


def _clip(s, a, x, lo=None, hi=None):
    lo = a.get("min") if lo is None else lo
    hi = a.get("max") if hi is None else hi
    return x if lo is None and hi is None else torch.clamp(x, lo, hi)


def _gelu(s, a, x):
    return F.gelu(x, approximate=a.get("approximate", "none"))


_CAST = ("saturate", "round_mode")       # both act on float8 / float4 targets only, which raise


def _fold(fn, xs):
    out = xs[0]
    for x in xs[1:]:
        out = fn(out, x)
    return out


def _hard_sigmoid(s, a, x):
    return torch.clamp(a.get("alpha", 0.2) * x + a.get("beta", 0.5), 0, 1)


# -- arithmetic ------------------------------------------------------------------------------------------
register("Add", lambda s, a, x, y: x + y)
register("Sub", lambda s, a, x, y: x - y)
register("Mul", lambda s, a, x, y: x * y)
register("Div", lambda s, a, x, y: torch.div(x, y, rounding_mode="trunc") if not x.is_floating_point() else x / y)
register("Pow", _pow)
register("Sqrt", lambda s, a, x: torch.sqrt(x))
register("Reciprocal", lambda s, a, x: torch.reciprocal(x))
register("Neg", lambda s, a, x: -x)
register("Abs", lambda s, a, x: torch.abs(x))
register("Exp", lambda s, a, x: torch.exp(x))
register("Log", lambda s, a, x: torch.log(x))
register("Erf", lambda s, a, x: torch.erf(x))
register("Sin", lambda s, a, x: torch.sin(x))
register("Cos", lambda s, a, x: torch.cos(x))
register("Max", lambda s, a, *xs: _fold(torch.maximum, xs))
register("Min", lambda s, a, *xs: _fold(torch.minimum, xs))
register("Clip", _clip, attributes=("min", "max"))

# -- activations -----------------------------------------------------------------------------------------
register("Tanh", lambda s, a, x: torch.tanh(x))
register("Sigmoid", lambda s, a, x: torch.sigmoid(x))
register("Relu", lambda s, a, x: torch.relu(x))
register("LeakyRelu", lambda s, a, x: F.leaky_relu(x, a.get("alpha", 0.01)), attributes=("alpha",))
register("Gelu", _gelu, attributes=("approximate",))
register("HardSwish", lambda s, a, x: F.hardswish(x))
register("HardSigmoid", _hard_sigmoid, attributes=("alpha", "beta"))
register("Softplus", lambda s, a, x: F.softplus(x))
register("Elu", lambda s, a, x: F.elu(x, a.get("alpha", 1.0)), attributes=("alpha",))
register("PRelu", lambda s, a, x, slope: torch.where(x < 0, x * slope, x))

# -- comparisons and logic -------------------------------------------------------------------------------
register("Equal", lambda s, a, x, y: x == y)
register("Less", lambda s, a, x, y: x < y)
register("Greater", lambda s, a, x, y: x > y)
register("LessOrEqual", lambda s, a, x, y: x <= y)
register("GreaterOrEqual", lambda s, a, x, y: x >= y)
register("Not", lambda s, a, x: ~x)
register("And", lambda s, a, x, y: x & y)
register("Or", lambda s, a, x, y: x | y)
register("IsNaN", lambda s, a, x: torch.isnan(x))
register("Where", lambda s, a, c, x, y: torch.where(c, x, y))

# -- casts -----------------------------------------------------------------------------------------------
register("Cast", _cast, attributes=("to",) + _CAST)
register("CastLike", lambda s, a, x, y: x.to(y.dtype), attributes=_CAST)
register("Identity", lambda s, a, x: x)
