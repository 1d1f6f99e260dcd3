"""Reduced-precision matmuls for the TVM backend: graphopt's C kernels (kernels/*.c), called
from TVM for every weight matmul whose shape they take.

- "bf16": weights stored in bfloat16 panels [n / 16, k / 2, 32] (16 columns x 2 k steps per
  32-bit pair), activations rounded to bf16 (nearest even) when the matmul runs, products in
  bf16 and sums in fp32: AMX-BF16 tiles (tdpbf16ps) or AVX512-BF16 (vdpbf16ps).
- "int8": weights int8, symmetric per output column, in panels [n / 16, k / 4, 64] with their
  scales and column sums; each activation row quantized to int8 when the matmul runs
  (dynamic, symmetric per row); exact int32 sums, scaled once: AMX-INT8 (tdpbssd),
  AVX512-VNNI (vpdpbusd) or, on AVX2-only CPUs, int16 pair products (vpmaddwd).

`PackDenseWeights` packs the weights (lifted, run once at compile time) and calls `dense_call`:
a parallel loop over tasks (every row x a share of the 16-column panels, so the weights are
read once per call; `tasks_for`), each calling the C kernel. TVM's LLVM code generator has no bfloat
vector type, hence C: compiled at lowering time for the host's instruction set
(`build_kernel_object`) and linked into model.so. Norms, softmax, attention's activation
products and the residual stream stay fp32. Which kernel a CPU gets: `kernel_for`.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from typing import Iterable

from ...errors import BackendError
from .schedules import OPAQUE_PATTERN

KERNEL_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels")
TASKS_PER_THREAD = 1      # measured: docs/measurements/decisions.md

# kernel -> (precision, CPU flags it needs, compiler flags, source), best first per precision
KERNELS = {
    "amx_bf16": ("bf16", ("amx_tile", "amx_bf16", "avx512_bf16", "avx512bw"),
                 ("-mavx512f", "-mavx512bw", "-mavx512bf16", "-mamx-tile", "-mamx-bf16", "-DGRAPHOPT_AMX"),
                 "dense_bf16.c"),
    "avx512_bf16": ("bf16", ("avx512_bf16", "avx512bw"), ("-mavx512f", "-mavx512bw", "-mavx512bf16"),
                    "dense_bf16.c"),
    "amx_int8": ("int8", ("amx_tile", "amx_int8", "avx512bw"),
                 ("-mavx512f", "-mavx512bw", "-mamx-tile", "-mamx-int8", "-DGRAPHOPT_AMX"), "dense_int8.c"),
    "avx512_vnni": ("int8", ("avx512_vnni", "avx512bw"), ("-mavx512f", "-mavx512bw", "-mavx512vnni"),
                    "dense_int8.c"),
    "avx2_int8": ("int8", ("avx2", "fma"), ("-mavx2", "-mfma", "-Wno-psabi", "-DGRAPHOPT_AVX2"), "dense_int8.c"),
}
# float32 kernels (float32_kernels.py: attention, attention over a KV cache, RMSNorm): GCC vector
# code, 16 lanes in one register or two
F32_SOURCES = ("attention.c", "kv_attention.c", "rms_norm.c")
F32_KERNELS = {
    "f32_avx512": ("f32", ("avx512f",), ("-mavx512f", "-mfma", "-ffp-contract=fast"), F32_SOURCES),
    "f32_avx2": ("f32", ("avx2", "fma"), ("-mavx2", "-mfma", "-ffp-contract=fast", "-Wno-psabi"), F32_SOURCES),
}
K_MULTIPLE = {"bf16": 32, "int8": 64}      # k per AMX tile row (64 bytes)


def kernel_for(precision: str, features: Iterable[str] | None, requested: str | None = None,
               table: dict = KERNELS) -> str | None:
    """The best `precision` kernel of `table` code for CPU `features` may use (or `requested`,
    if it may), else None."""
    have = set(features or ())
    if requested is not None:
        if requested not in table or table[requested][0] != precision:
            names = [name for name, spec in table.items() if spec[0] == precision]
            raise BackendError(f"unknown {precision} kernel '{requested}'; use one of {', '.join(names)}")
        missing = [f for f in table[requested][1] if f not in have]
        if missing:
            raise BackendError(f"{precision} kernel '{requested}' needs CPU features {', '.join(missing)}, "
                               "which the target does not have")
        return requested
    return next((name for name, (p, needs, _, _) in table.items()
                 if p == precision and all(f in have for f in needs)), None)


def supports(precision: str, k: int) -> bool:
    """Whether a weight matmul with inner size k can take the `precision` kernels (n is padded to 16)."""
    return k % K_MULTIPLE[precision] == 0


def build_kernel_objects(kernel: str, directory: str) -> list[str]:
    """Compile the C sources of `kernel` for its instruction set into object files in `directory`."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise BackendError("tvm backend: graphopt's C kernels need a C compiler (cc or gcc; TVM's export "
                           "links with one too)")
    _, _, flags, sources = KERNELS[kernel] if kernel in KERNELS else F32_KERNELS[kernel]
    objects = []
    for source in (sources,) if isinstance(sources, str) else sources:
        out = os.path.join(directory, f"{kernel}_{os.path.splitext(source)[0]}.o")
        command = [compiler, "-O3", "-fPIC", "-std=c11", *flags, "-c", os.path.join(KERNEL_DIR, source), "-o", out]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise BackendError(f"tvm backend: compiling the {kernel} kernel failed ({' '.join(command)}): {last}")
        objects.append(out)
    return objects


def tasks_for(threads: int) -> int:
    """Tasks per matmul for a library run with `threads` threads: each task rounds or quantizes
    all of X again, so as few as threads (measured faster than two a thread)."""
    return TASKS_PER_THREAD * max(1, threads)


def leading_rows(shape: list) -> tuple:
    """(rows, static_rows) of a tensor seen as [rows, last dim]: the product of the leading dims
    (a simplified TIR expression) and that as an int when it is static, else None."""
    import tvm
    from tvm import tirx
    rows = 1
    for dim in shape[:-1]:
        rows = rows * dim
    rows = tvm.sym.Analyzer().simplify(rows)
    return rows, int(rows) if isinstance(rows, tirx.IntImm) else None


def dense_call(precision: str, m, k: int, n: int, tasks: int, outliers: int = 0):
    """The TIR function Y[m, n] = X[m, k] @ W for packed `precision` weights; `m` an int or a tirx.Var.

    bf16 reads (X, panels); int8 reads (X, panels, column scales, column sums, x smoothing
    [, the `outliers` outlier channels and their fp32 weight panels]): pipeline._int8_panels."""
    from tvm import te, tirx

    if precision == "bf16":
        weights = [te.placeholder((n // 16, k // 2, 32), "bfloat16", name="W")]
    else:
        weights = [te.placeholder((n // 16, k // 4, 64), "int8", name="W"),
                   te.placeholder((n,), "float32", name="w_scale"), te.placeholder((n,), "int32", name="w_sums"),
                   te.placeholder((k,), "float32", name="x_smoothing")]
        if outliers:
            weights += [te.placeholder((outliers,), "int32", name="outlier_channels"),
                        te.placeholder((n // 16, outliers, 16), "float32", name="outlier_weights")]

    def arguments(ins, y):
        # A bf16 parameter is its own tensor (offset 0), and TVM's bf16 legalization rejects its access_ptr.
        pointers = [ins[0].access_ptr("r")] + [w.data if w.dtype == "bfloat16" else w.access_ptr("r") for w in ins[1:]]
        sizes = [tirx.Cast("int64", m), tirx.const(k, "int64"), tirx.const(n, "int64")]
        if precision == "int8":
            if not outliers:        # the kernel reads the outlier pointers only when there are outliers
                pointers += [pointers[-1], pointers[-1]]
            sizes.append(tirx.const(outliers, "int64"))
        return [*pointers, y, *sizes]
    return parallel_extern(f"graphopt_dense_{precision}", m, k, n, weights, arguments, tasks)


def parallel_extern(symbol: str, m, k: int, n: int, weights: list, arguments, tasks: int):
    """A TIR function Y[m, n] (float32) of X[m, k] (float32) and `weights` (te placeholders) that
    calls the C function `symbol`(*arguments(ins, y pointer), task, tasks) from a parallel loop
    over the tasks (at most `tasks`, one per 4 panels of 16 columns)."""
    from tvm import te, tirx

    x = te.placeholder((m, k), "float32", name="X")
    tasks = min(tasks, -(-(n // 16) // 4))

    def body(ins, outs):
        # access_ptr, not .data, for activations: a tensor may start at an offset into planned
        # storage. The loop variable is int32 and cast: an int64 one is narrowed to i32 by TVM
        # and the C side would read garbage in the upper half.
        task = tirx.Var("task", "int32")
        call = tirx.call_extern("int32", symbol, *arguments(ins, outs[0].access_ptr("w")),
                                tirx.Cast("int64", task), tirx.const(tasks, "int64"))
        return tirx.For(task, tirx.const(0, "int32"), tirx.const(tasks, "int32"), tirx.ForKind.PARALLEL,
                        tirx.Evaluate(call))

    y = te.extern((m, n), [x, *weights], body, name="Y", dtype="float32")
    func = te.create_prim_func([x, *weights, y])
    return (func.with_attr("tirx.is_scheduled", True).with_attr("op_pattern", OPAQUE_PATTERN)
            .without_attr("global_symbol"))
