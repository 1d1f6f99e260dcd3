"""bf16 matmuls for the TVM backend: weights stored in bfloat16, products in bf16, sums in fp32.

A weight matmul (`PackDenseWeights` with precision "bf16") calls `dense_bf16`, a parallel loop
over TASKS tasks (every row x a share of the 16-column panels: the weights are read once per
call) that each call graphopt's C kernel (kernels/dense_bf16.c): the rows rounded to bf16
(nearest even), then AMX-BF16 tiles
(tdpbf16ps) or AVX512-BF16 dot products (vdpbf16ps) over the weight's bf16 panels
[n / 16, k / 2, 32] (16 columns x 2 k steps per 32-bit pair, the layout both instructions
read). TVM's LLVM code generator has no bfloat vector type, so these instructions live in C,
compiled at lowering time for the host's instruction set and linked into model.so.

Everything else (norms, softmax, attention's activation products, the residual stream) stays
fp32. Which kernel a CPU gets: `bf16_kernel_for`; without AVX512-BF16 there is none and the
backend says it computes in fp32.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from typing import Iterable

from ...errors import BackendError
from .schedules import OPAQUE_PATTERN

KERNEL_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels", "dense_bf16.c")
TASKS = 16                # per matmul, at most one per 4 panels (64 columns)
K_MULTIPLE = 32           # an AMX tile row holds 32 bf16 values of k

# kernel -> (CPU flags it needs, compiler flags), best first
BF16_KERNELS = {
    "amx_bf16": (("amx_tile", "amx_bf16", "avx512_bf16", "avx512bw"),
                 ("-mavx512f", "-mavx512bw", "-mavx512bf16", "-mamx-tile", "-mamx-bf16", "-DGRAPHOPT_AMX")),
    "avx512_bf16": (("avx512_bf16", "avx512bw"), ("-mavx512f", "-mavx512bw", "-mavx512bf16")),
}


def bf16_kernel_for(features: Iterable[str] | None, requested: str | None = None) -> str | None:
    """The best bf16 kernel code for CPU `features` may use (or `requested`, if it may), else None."""
    have = set(features or ())
    if requested is not None:
        if requested not in BF16_KERNELS:
            raise BackendError(f"unknown bf16 kernel '{requested}'; use one of {', '.join(BF16_KERNELS)}")
        missing = [f for f in BF16_KERNELS[requested][0] if f not in have]
        if missing:
            raise BackendError(f"bf16 kernel '{requested}' needs CPU features {', '.join(missing)}, "
                               "which the target does not have")
        return requested
    return next((name for name, (needs, _) in BF16_KERNELS.items() if all(f in have for f in needs)), None)


def supports(k: int, n: int) -> bool:
    """Whether a k x n weight matmul can take the bf16 kernel (n is padded to 16 columns)."""
    return k % K_MULTIPLE == 0


def build_kernel_object(kernel: str, directory: str) -> str:
    """Compile kernels/dense_bf16.c for `kernel` into an object file in `directory`."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise BackendError("tvm backend: bf16 kernels need a C compiler (cc or gcc; TVM's export links with one too)")
    out = os.path.join(directory, f"dense_{kernel}.o")
    command = [compiler, "-O3", "-fPIC", "-std=c11", *BF16_KERNELS[kernel][1], "-c", KERNEL_SOURCE, "-o", out]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise BackendError(f"tvm backend: compiling the {kernel} kernel failed ({' '.join(command)}): {last}")
    return out


def dense_bf16(m, k: int, n: int):
    """Y[m, n] = X[m, k] @ W where W is bf16 panels [n / 16, k / 2, 32]; `m` an int or a tirx.Var."""
    from tvm import te, tirx

    x = te.placeholder((m, k), "float32", name="X")
    w = te.placeholder((n // 16, k // 2, 32), "bfloat16", name="W")
    tasks = min(TASKS, -(-(n // 16) // 4))

    def body(ins, outs):
        task = tirx.Var("task", "int32")
        # access_ptr, not .data: an activation may start at an offset into planned storage. The
        # weight is a parameter (its own tensor, offset 0); TVM's bf16 legalization rejects its access_ptr.
        # The loop variable is int32 and cast: an int64 one is narrowed to i32 by TVM and the C
        # side would read garbage in the upper half.
        sizes = [tirx.Cast("int64", m), tirx.const(k, "int64"), tirx.const(n, "int64")]
        call = tirx.call_extern("int32", "graphopt_dense_bf16", ins[0].access_ptr("r"), ins[1].data,
                                outs[0].access_ptr("w"), *sizes, tirx.Cast("int64", task), tirx.const(tasks, "int64"))
        return tirx.For(task, tirx.const(0, "int32"), tirx.const(tasks, "int32"), tirx.ForKind.PARALLEL,
                        tirx.Evaluate(call))

    y = te.extern((m, n), [x, w], body, name="Y", dtype="float32")
    func = te.create_prim_func([x, w, y])
    return (func.with_attr("tirx.is_scheduled", True).with_attr("op_pattern", OPAQUE_PATTERN)
            .without_attr("global_symbol"))
