"""A vectorizable float32 exp for TVM's LLVM targets.

TVM lowers `exp` to `llvm.exp.f32`, which LLVM cannot vectorize without a vector math
library: a vectorized softmax or SiLU loop becomes 16 scalar `expf` calls per vector
(SmolLM2: ~20 ms of a ~165 ms prefill). `register_fast_exp()` replaces that lowering, for
float32 only, by Cody-Waite range reduction (x = n ln2 + r, |r| <= ln2 / 2), a degree-7
polynomial for e^r (truncation error < 6e-9 relative) and 2^n built in the exponent bits:
plain arithmetic, which LLVM vectorizes. Below -87.3 it returns 0 (libm gives denormals down
to -103.3); above 88.3 it returns e^88.3 (~2.2e38) where libm reaches 3.4e38 and then inf.

The registration is process-wide (TVM keeps intrinsic lowerings in a global registry): after
`import graphopt.backends.tvm.lower`, every float32 exp that TVM compiles for LLVM uses it.
"""
from __future__ import annotations

import tvm
from tvm import tirx

_LOG2E = 1.4426950408889634
_LN2_HI = 0.693145751953125          # ln 2 split so that n * _LN2_HI is exact in float32
_LN2_LO = 1.428606765330187e-06
_COEFFICIENTS = [1.0, 1.0, 1 / 2, 1 / 6, 1 / 24, 1 / 120, 1 / 720, 1 / 5040]
_LEVEL = 100                          # above TVM's own llvm rule
_registered = False


def _exp_f32(x, lanes: int):
    def const(value, dtype="float32"):
        scalar = tirx.const(value, dtype)
        return tirx.Broadcast(scalar, lanes) if lanes > 1 else scalar

    int_type = "int32" if lanes == 1 else f"int32x{lanes}"
    underflow = x < const(-87.3)
    x = tirx.max(tirx.min(x, const(88.3)), const(-87.3))
    n = tirx.floor(x * const(_LOG2E) + const(0.5))
    r = x - n * const(_LN2_HI) - n * const(_LN2_LO)
    poly = const(_COEFFICIENTS[-1])
    for c in reversed(_COEFFICIENTS[:-1]):
        poly = poly * r + const(c)
    exponent = tirx.shift_left(tirx.Cast(int_type, n) + const(127, "int32"), const(23, "int32"))
    value = poly * tirx.reinterpret("float32" if lanes == 1 else f"float32x{lanes}", exponent)
    # exactly 0 below the clamp: a softmax's masked -inf must not leave ~1e-38, whose
    # quotients are denormals (slow: docs/measurements/decisions.md)
    return tirx.Select(underflow, const(0.0), value)


def _lower_exp(call):
    dtype = tvm.DataType(str(call.ty))
    if dtype.type_code == tvm.DataTypeCode.FLOAT and dtype.bits == 32:
        return _exp_f32(call.args[0], dtype.lanes)
    return tirx.call_llvm_pure_intrin(str(call.ty), "llvm.exp", tirx.const(1, "uint32"), call.args[0])


def register_fast_exp() -> None:
    global _registered
    if not _registered:
        tirx.register_intrin_lowering("tirx.exp", target="llvm", f=_lower_exp, level=_LEVEL)
        _registered = True
