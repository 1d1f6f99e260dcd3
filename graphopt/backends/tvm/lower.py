"""Apache TVM backend: IR -> torch.export -> Relax -> our CPU schedules -> a shared library.

Lowering, step by step:
1. `prepare_graph` rewrites the IR (in place, semantics unchanged) where TVM's importer or
   codegen breaks: a cumsum over a bool tensor (Hugging Face's mask code) reached LLVM as an
   add on i1 and failed in CodeGenLLVM::CreateAdd, so bool inputs of sums are cast first;
   weights that passes made (plain attributes, buffers) become parameters, or the importer
   would embed them as constants; static-size slices of dynamic dims become index_select;
   negative indices are wrapped (TVM's take would read out of bounds); a pooling stride left
   empty (= the kernel) is written out; an unsorted topk asks for sorted output (any order
   is allowed, the importer takes sorted only); mixture-of-experts ops take their dense form
   (graphopt.ir.moe.dense_moe_experts: static shapes, every expert on every token). Where
   the target has graphopt's float32 kernels (AVX-512 or AVX2), attention (with the rotary
   embedding of query and key, grouped key/value heads read in place) and RMSNorm (with the
   residual add before it) become graphopt ops, each one C-kernel call (float32_kernels.py).
   If re-exporting then fails on a view of an attention output, those views become reshapes
   (graphopt.ir.graph.export_retrying_with_reshapes).
2. Every op is checked against the Relax importer's table before import; an op it cannot
   import stops the lowering with the op, the node and the source line.
3. The importer keeps the weights as function parameters. `PackDenseWeights` turns every
   matmul with a weight operand into a call of `packed_dense` (schedules.py), reading the
   weight packed in panels; LiftTransformParams moves the packing out of `main`, and it runs
   once at compile time.
4. TVM's CPU pipeline (legalize, fuse) with our schedule rules in the middle, built for the
   host CPU (LLVM, AVX-512 when present). With precision "bf16" or "int8" the weight matmuls
   call graphopt's C kernels instead (dense_kernels.py: AMX or AVX-512 BF16 / VNNI), compiled
   for the host and linked into the library.

The artifact holds `model.so` (export_library) and `params.bin` (TVM's own parameter
format, not pickle); graphopt.backends.tvm.runner.TvmRunner runs it with only numpy and the TVM runtime.
"""
from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
import time
from typing import Any

import torch
import torch.fx as fx

from ...errors import BackendError, GraphoptError, UnsupportedOpError
from ...frontend.torch_export import CapturedModel
from ...ir.graph import export_retrying_with_reshapes
from ...runtime import default_threads
from ..base import Backend, WorkdirExecutable
from .dense_kernels import K_MULTIPLE, KERNELS, build_kernel_objects, kernel_for, tasks_for
from .float32_kernels import Float32Converters, float32_kernel
from .int8_plan import ALPHA, CALIBRATION_BATCHES, int8_plans
from .intrinsics import register_fast_exp
from .prepare import positive_slice_dims, prepare_graph
from .quantized import QuantizedConverters
from .runner import (
    TVM_LIBRARY,
    TVM_PARAMS,
    TvmRunner,
    check_cpu_features,
    host_target,
    required_cpu_features,
    rotary_table,
    tvm_target,
    use_all_cores_for_tvm,
)
from .schedules import panel_lanes

use_all_cores_for_tvm()   # before any TVM kernel runs (the weight packing at compile time does)
register_fast_exp()       # vectorizable float32 exp for LLVM (process-wide; see intrinsics.py)

PRECISIONS = ("f32", "bf16", "int8")
# what a reduced-precision kernel computes, for the pass log
_COMPUTES = {"bf16": "weight matmuls in bf16 (fp32 sums)",
             "int8": "weight matmuls in int8 (weights per column, activations per row when it runs; int32 sums)"}

# Users may add entries: ATen op name ("add.Tensor") -> a converter, as TVM's
# from_exported_program(custom_convert_map=...) takes them.
CUSTOM_CONVERT_MAP: dict = {}


class TvmExecutable(WorkdirExecutable):
    backend = "tvm"

    def __init__(self, workdir: str, captured: CapturedModel, threads: int | None, target: dict,
                 compile_seconds: float, precision: str = "f32", kernel: str | None = None,
                 packed_weights: dict | None = None):
        self.workdir = workdir
        self.threads = threads
        self.target = target
        self.compile_seconds = compile_seconds
        self.precision = precision
        self.kernel = kernel
        self.packed_weights = packed_weights or {}
        self.captured = captured
        self.derived_params: dict = {}
        self.runner = TvmRunner(os.path.join(workdir, TVM_LIBRARY), os.path.join(workdir, TVM_PARAMS),
                                captured.inputs, captured.outputs, threads)

    def store_rotary_tables_as_recipes(self, inv_freq, positions: int, scaling: float = 1.0) -> int:
        """Weights equal to the rotary tables of `inv_freq` (computed at compile time: 2 MB for
        SmolLM2) leave params.bin; the manifest keeps their recipe and loading recomputes them
        (runner.rotary_table). Returns how many were found."""
        import numpy as np
        import tvm
        path = os.path.join(self.workdir, TVM_PARAMS)
        params = {name: value.numpy() for name, value in tvm.runtime.load_param_dict_from_file(path).items()}
        frequencies = [float(f) for f in np.asarray(inv_freq, dtype=np.float32)]
        found = {}
        for kind in ("cos", "sin"):
            table = rotary_table(kind, frequencies, positions, scaling)
            for name, value in params.items():
                if name not in found and value.shape == table.shape and value.dtype == table.dtype \
                        and float(np.abs(value - table).max()) <= 1e-6:
                    found[name] = {"kind": f"rotary_{kind}", "inv_freq": frequencies, "positions": positions,
                                   "scaling": scaling}
                    break
        if found:
            tvm.runtime.save_param_dict_to_file({n: v for n, v in params.items() if n not in found}, path)
            self.derived_params.update(found)
            self.runner = TvmRunner(os.path.join(self.workdir, TVM_LIBRARY), path, self.captured.inputs,
                                    self.captured.outputs, self.threads, self.derived_params)
        return len(found)

    @property
    def reduced_precision(self):
        parts = [f"{_COMPUTES[self.precision]}, {self.kernel} kernel"] if self.kernel else []
        weights = self.packed_weights
        for pattern, precision in weights.get("precision_overrides", {}).items():
            kernel = weights["override_kernels"].get(precision)
            computed = f"in {precision}, {kernel} kernel" if kernel else "in fp32" if precision == "f32" else \
                f"in fp32 (no {precision} kernel on this target)"
            parts.append(f"weights matching '{pattern}' {computed}")
        if weights.get("weights_by_precision"):
            counts = ", ".join(f"{count} {precision}"
                               for precision, count in sorted(weights["weights_by_precision"].items()))
            parts.append(f"weight matmuls: {counts}")
        if "int8_smoothed_weights" in weights:
            parts.append(f"activations smoothed per channel (SmoothQuant, alpha {ALPHA}) in "
                         f"{weights['int8_smoothed_weights']} weights, {weights['int8_outlier_channels']} outlier "
                         f"channels in fp32, learnt from {weights['int8_plan_batches']} batch(es)")
        if weights.get("nbits_kernel"):
            parts.append(f"block-quantized weights dequantized to bf16 (bf16 products, fp32 sums), "
                         f"{weights['nbits_kernel']} kernel")
        return "; ".join(parts) or None

    def save_files(self, directory):
        self.copy_files(directory, (TVM_LIBRARY, TVM_PARAMS))
        return {"library": TVM_LIBRARY, "params": TVM_PARAMS, "threads": self.threads,
                "target": self.target, "cpu_features": required_cpu_features(self.target),
                "compile_seconds": round(self.compile_seconds, 1), "precision": self.precision,
                **({"derived_params": self.derived_params} if self.derived_params else {}),
                "precision_computed": self.precision if self.kernel else "f32", "kernel": self.kernel,
                **self.packed_weights}


class TvmBackend(Backend):
    """Options: `threads` (default: all cores), `target` ('host', the default: this CPU's
    every feature; an x86-64 level such as 'x86-64-v3' (AVX2) for a library that runs on any
    CPU of that level; or a TVM target dict), `schedules` (False builds TVM's unscheduled
    loops: for comparisons only), `precision` ('f32', the default; 'bf16': weight matmuls in
    bf16 with fp32 sums where the target has AMX-BF16 or AVX512-BF16; 'int8': int8 weights and
    dynamic int8 activations where it has AMX-INT8 or AVX512-VNNI; else fp32 with a one-line
    notice), `kernel` (e.g. 'avx512_bf16' on an AMX CPU: one of that precision the target has;
    at f32, the bf16 kernel for the int4/int8 presets' quantized weights, which always run in
    one), `precision_overrides` (mixed precision: {pattern: precision}, a weight whose graph
    attribute name a pattern matches (re.search, first match wins; e.g. 'lm_head') runs its
    matmuls in that precision instead, with that precision's best kernel on the target, or
    fp32 with a notice). The CPU features the library needs go in the manifest; loading
    refuses a CPU that lacks one."""

    name = "tvm"

    def __init__(self, threads: int | None = None, target: dict | str | None = None, schedules: bool = True,
                 precision: str = "f32", kernel: str | None = None, precision_overrides: dict | None = None):
        if precision not in PRECISIONS:
            raise BackendError(f"unknown TVM precision '{precision}'; use one of {', '.join(PRECISIONS)}")
        self.threads = threads
        self.target = tvm_target(target)
        features = required_cpu_features(self.target)
        check_cpu_features(features, f"a TVM library for CPU '{self.target.get('mcpu')}'")
        self.schedules = schedules
        self.precision = precision
        self.overrides = _checked_overrides(precision_overrides)
        # quantized weights (int4/int8 presets) run in a bf16 kernel: the precision's if it is bf16,
        # else the best the target has, or `kernel` when it names a bf16 one at precision f32
        self.nbits_kernel = kernel_for("bf16", features, kernel if precision == "f32" else None)
        self.kernels: dict[str, str] = {}      # reduced precision in use -> its kernel (one per precision)
        if (precision != "f32" or set(self.overrides.values()) - {"f32"}) and not schedules:
            raise BackendError("tvm backend: reduced precisions need schedules=True (their kernels replace the "
                               "scheduled matmuls)")
        for wanted in sorted({precision, *self.overrides.values()} - {"f32"}):
            if wanted == "bf16" and precision != "bf16":
                found = self.nbits_kernel      # one bf16 kernel per library (it defines graphopt_dense_bf16)
            else:
                found = kernel_for(wanted, features, kernel if wanted == precision else None)
            if found is None:
                names = " nor ".join(name for name, spec in KERNELS.items() if spec[0] == wanted)
                print(f"tvm backend: {wanted} is not supported on this target (CPU '{self.target.get('mcpu')}' "
                      f"has no {names}): computing in fp32", file=sys.stderr)
            else:
                self.kernels[wanted] = found
        self.kernel = self.kernels.get(precision)
        if precision == "bf16":
            self.nbits_kernel = self.kernel

    def compile(self, captured, progress=False, calibration=None):
        started = time.perf_counter()
        plans = None
        if "int8" in self.kernels:
            batches = [captured.example_inputs, *list(calibration or [])[:CALIBRATION_BATCHES]]
            plans = int8_plans(captured.graph_module, batches)
        workdir = tempfile.mkdtemp(prefix="graphopt-tvm-")
        try:
            weights = build_library(captured, workdir, self.target, self.schedules, self.kernel, self.nbits_kernel,
                                    tasks_for(self.threads or default_threads()), plans, self.overrides,
                                    self.kernels)
            if plans is not None:
                weights["int8_plan_batches"] = len(batches)
            if weights["fp32_by_shape"]:
                total = weights["reduced_weights"] + weights["fp32_weights"]
                needs = ", ".join(f"{p} kernels need k a multiple of {K_MULTIPLE[p]}" for p in sorted(self.kernels))
                print(f"tvm backend: {weights['fp32_by_shape']} of {total} weight matmuls stay fp32 ({needs})",
                      file=sys.stderr)
            return TvmExecutable(workdir, captured, self.threads, self.target, time.perf_counter() - started,
                                 self.precision, self.kernel, weights)
        except BaseException:
            shutil.rmtree(workdir, ignore_errors=True)
            raise


def _checked_overrides(overrides: dict | None) -> dict:
    """precision_overrides, each pattern compiled once to check it and each precision known."""
    for pattern, precision in (overrides or {}).items():
        if precision not in PRECISIONS:
            raise BackendError(f"tvm backend: precision_overrides['{pattern}'] = '{precision}'; "
                               f"use one of {', '.join(PRECISIONS)}")
        try:
            re.compile(pattern)
        except re.error as exc:
            raise BackendError(f"tvm backend: precision_overrides pattern '{pattern}' is not a regular "
                               f"expression: {exc}") from None
    return dict(overrides or {})


def weight_precisions(names, overrides: dict | None) -> dict:
    """Graph attribute name -> precision, for each of `names` a pattern of `overrides` matches
    (re.search; the first matching pattern in order)."""
    out = {}
    for name in names:
        for pattern, precision in (overrides or {}).items():
            if re.search(pattern, name):
                out[name] = precision
                break
    return out


def _check_overrides_matched(overrides: dict | None, names: dict, packed: set) -> None:
    """A precision_overrides pattern that matches no weight matmul is a mistake: refuse it."""
    matmul_weights = sorted(name for name, param in names.items() if param in packed)
    for pattern in overrides or {}:
        if not any(re.search(pattern, name) for name in matmul_weights):
            shown = ", ".join(matmul_weights[:3]) + (", ..." if len(matmul_weights) > 3 else "")
            raise BackendError(f"tvm backend: precision_overrides pattern '{pattern}' matches no weight matmul "
                               f"(their weights: {shown or 'none'})")


def _source_line(node: fx.Node) -> str:
    trace = (node.meta.get("stack_trace") or "").strip().splitlines()
    for line in reversed(trace):
        if line.strip().startswith("File "):
            return " at " + line.strip()
    return ""


def check_supported(program: torch.export.ExportedProgram, convert_map: dict) -> None:
    for node in program.graph.nodes:
        if node.op == "call_function" and getattr(node.target, "__name__", str(node.target)) not in convert_map:
            name = getattr(node.target, "__name__", str(node.target))
            raise UnsupportedOpError(
                f"tvm backend: no Relax conversion for op '{name}' (node '{node.name}'){_source_line(node)}; "
                "add one to graphopt.backends.tvm.lower.CUSTOM_CONVERT_MAP or use backend='onnxruntime'")


def import_relax(captured: CapturedModel, quantized: QuantizedConverters | None = None,
                 float32: Float32Converters | None = None):
    """The IR as a Relax IRModule with weights as parameters, plus the weights (in order).
    `quantized` converts block-quantized ops (default: with the host's bf16 kernel, if any);
    `float32` lowers attention and RMSNorm to graphopt's float32 kernels (default: none, TVM's
    own ops)."""
    mod, params, _ = _import_relax(captured, quantized, float32)
    return mod, params


def _import_relax(captured: CapturedModel, quantized: QuantizedConverters | None,
                  float32: Float32Converters | None):
    """import_relax, plus the Relax parameter name of each graph attribute (by its name)."""
    from tvm.relax.frontend import detach_params
    from tvm.relax.frontend.torch import from_exported_program
    from tvm.relax.frontend.torch.exported_program_translator import ExportedProgramImporter

    float32 = float32 or Float32Converters(None, 1)
    gm = prepare_graph(captured.graph_module, float32_kernels=float32.kernel is not None)
    shapes = captured.dynamic_shapes()
    try:
        program = export_retrying_with_reshapes(gm, lambda: torch.export.export(
            gm, captured.example_inputs, dynamic_shapes=shapes).run_decompositions())
        positive_slice_dims(program.graph_module)
    except Exception as exc:  # noqa: BLE001 - torch.export raises many types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BackendError(f"tvm backend: re-exporting the IR failed: {first}") from exc
    if quantized is None:
        quantized = QuantizedConverters(kernel_for("bf16", required_cpu_features(host_target())),
                                        tasks_for(default_threads()))
    converters = {**quantized.convert_map(), **float32.convert_map(), **CUSTOM_CONVERT_MAP}
    importer = ExportedProgramImporter()
    importer.update_convert_map(converters)
    check_supported(program, importer.convert_map)
    try:
        mod = from_exported_program(program, keep_params_as_input=True, run_ep_decomposition=False,
                                    custom_convert_map=converters)
    except GraphoptError:
        raise
    except Exception as exc:  # noqa: BLE001 - the importer raises asserts and TVM errors
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BackendError(f"tvm backend: Relax import failed: {first}") from exc
    _check_output_types(mod, captured)
    mod, params = detach_params(mod)
    names = {spec.target: spec.arg.name for spec in program.graph_signature.input_specs
             if spec.target is not None and hasattr(spec.arg, "name")}
    return mod, list(params.get("main", [])), names


def _check_output_types(mod, captured: CapturedModel) -> None:
    """TVM's importer must return the element types the graph computes; where it does not
    (it computes some float16/float64 graphs and MaxPool's indices as float32), refuse."""
    ret = mod["main"].ret_ty
    fields = list(ret.fields) if hasattr(ret, "fields") else [ret]
    for spec, info in zip(captured.outputs, fields):
        dtype = str(getattr(info, "dtype", ""))
        if dtype and dtype != spec.dtype:
            raise UnsupportedOpError(f"tvm backend: output '{spec.name}' comes out of TVM's Relax importer as {dtype}, "
                                     f"the graph computes {spec.dtype}; use backend='onnxruntime' for this graph")


def build_library(captured: CapturedModel, workdir: str, target_dict: dict, schedules: bool = True,
                  kernel: str | None = None, nbits_kernel: str | None = None, tasks: int = 2,
                  int8_plans: dict | None = None, overrides: dict | None = None,
                  kernels: dict | None = None) -> dict:
    """Build model.so and params.bin in `workdir` (weight matmuls in `kernel`'s precision where
    it takes them, quantized weights in the bf16 `nbits_kernel`); returns how many packed
    weights are in that precision and in fp32, and the kernel quantized weights used. `tasks`:
    parallel calls per C-kernel matmul (dense_kernels.tasks_for the threads it will run with);
    `int8_plans`: graph attribute name -> int8_plan.Int8Plan of the int8 kernels; `overrides`:
    {pattern: precision} for the weights whose graph attribute name a pattern matches, computed
    in `kernels`' kernel of that precision (fp32 if it has none)."""
    import tvm
    from tvm import relax

    from .pipeline import PackDenseWeights, cpu_pipeline

    quantized = QuantizedConverters(nbits_kernel, tasks)
    features = required_cpu_features(target_dict)
    float32 = Float32Converters(float32_kernel(features) if schedules else None, tasks)
    mod, params, names = _import_relax(captured, quantized, float32)
    # torch.export's upper bounds of dynamic dims (4096 each) would size every intermediate
    # for all of them at once (batch x tokens x ...): without them memory is planned per call
    mod["main"] = mod["main"].without_attr("tir_var_upper_bound")
    target = tvm.target.Target(target_dict)
    kernels = dict(kernels or {})
    if kernel:
        kernels[KERNELS[kernel][0]] = kernel
    chosen = {names[name]: precision if precision == "f32" or precision in kernels else "f32"
              for name, precision in weight_precisions(names, overrides).items()}
    packing = PackDenseWeights(KERNELS[kernel][0] if kernel else "f32", tasks,
                               {names[name]: plan for name, plan in (int8_plans or {}).items() if name in names},
                               panel_lanes(features), chosen)
    if schedules:
        mod = packing(mod)
        _check_overrides_matched(overrides, names, packing.packed_names)
    mod = relax.transform.LiftTransformParams()(mod)
    try:
        executable = relax.build(mod, target=target, relax_pipeline=cpu_pipeline(target, schedules))
    except Exception as exc:  # noqa: BLE001 - TVM raises InternalError, ValueError and friends
        text = str(exc).strip().splitlines()
        last = next((line for line in reversed(text) if line.strip()), type(exc).__name__).strip()
        if captured.dynamic_dims:
            raise BackendError(f"tvm backend: compilation failed with dynamic dimensions ({last}); TVM's shape "
                               "inference does not follow this graph's dynamic dims: compile with static shapes "
                               "for TVM") from exc
        raise BackendError(f"tvm backend: compilation failed: {last}") from exc
    library = os.path.join(workdir, TVM_LIBRARY)
    used = {kernels[p] for p in packing.weights_by_precision if p in kernels}
    linked = sorted(used | {name for name in (quantized.kernel if quantized.used else None,
                                              float32.kernel if float32.used else None) if name})
    with tempfile.TemporaryDirectory(prefix="graphopt-tvm-kernels-") as objects:
        addons = [path for name in linked for path in build_kernel_objects(name, objects)]
        executable.export_library(library, addons=addons or None)
    transformed = _transform_params(tvm.runtime.load_module(library), mod, params)
    tvm.runtime.save_param_dict_to_file({f"p{i}": t for i, t in enumerate(transformed)},
                                        os.path.join(workdir, TVM_PARAMS))
    return {"reduced_weights": packing.reduced_weights, "fp32_weights": packing.fp32_weights,
            "fp32_by_shape": packing.fp32_by_shape,
            **({"precision_overrides": dict(overrides), "weights_by_precision": packing.weights_by_precision,
                "override_kernels": {p: kernels[p] for p in set(overrides.values()) if p in kernels}}
               if overrides else {}),
            "nbits_kernel": quantized.kernel if quantized.used else None,
            "float32_kernel": float32.kernel if float32.used else None,
            "kernel_tasks": tasks if kernel or quantized.used else None,
            **({"int8_smoothed_weights": packing.smoothed_weights,
                "int8_outlier_channels": packing.outlier_channels} if "int8" in kernels else {})}


def _transform_params(executable, mod, params: list[Any]) -> list[Any]:
    """Run the lifted weight transforms (packing) once, at compile time, in the exported
    library (it holds the C kernels the in-memory module cannot resolve)."""
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(executable, tvm.cpu())
    name = "main_transform_params"
    if name not in [gv.name_hint for gv in mod.get_global_vars()]:
        return list(params)
    out = vm[name](params)
    return [out[i] for i in range(len(out))]
