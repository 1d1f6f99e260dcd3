"""Relax-level passes of the TVM backend: weight packing for matmuls (and embedding lookups
in the same weights), and the CPU pipeline (TVM's own legalize / fuse / lower passes with
graphopt's schedule rules in the middle)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax, te, tirx
from tvm.s_tir import dlight

from ...errors import BackendError
from . import dense_kernels
from .int8_plan import Int8Plan
from .schedules import default_rules, dense_lanes, packed_dense

_MATMUL = tvm.ir.Op.get("relax.matmul")
_PERMUTE = tvm.ir.Op.get("relax.permute_dims")
_TAKE = tvm.ir.Op.get("relax.take")


def _static_shape(expr) -> list | None:
    ty = getattr(expr, "ty", None)
    if not isinstance(ty, relax.TensorType) or ty.shape is None or not hasattr(ty.shape, "values"):
        return None
    return list(ty.shape.values)


@dataclass
class _Packing:
    """How a weight is packed: panels [padded / lanes, k, lanes] of its n output columns."""

    transposed: bool      # the weight is [n, k] (a linear's), else [k, n]
    n: int
    k: int
    lanes: int
    precision: str = "f32"    # "bf16" / "int8": panels for graphopt's C kernels (dense_kernels.py)
    plan: Int8Plan | None = None      # int8: smoothing and outlier channels of its activations

    @property
    def padded(self) -> int:
        return -(-self.n // self.lanes) * self.lanes


def _weight_matmuls(main: relax.Function, weights: set, precision: str = "f32", plans: dict | None = None,
                    widest: int = 32, overrides: dict | None = None) -> dict:
    """Weight var -> its packing, for every float32 2-D weight some matmul reads as W or W^T:
    fp32 panels of up to `widest` lanes (schedules.panel_lanes); with precision "bf16" / "int8"
    (or the one `overrides` has under the weight's name), that precision's panels wherever its
    kernels take the shape (int8: with the plan `plans` has under the weight's name, if any)."""
    bound = {}
    packings = {}
    for block in main.body.blocks:
        for binding in block.bindings:
            bound[binding.var] = binding.value
    for value in bound.values():
        if not (isinstance(value, relax.Call) and value.op == _MATMUL):
            continue
        rhs, transposed = value.args[1], False
        source = bound.get(rhs)
        if isinstance(source, relax.Call) and source.op == _PERMUTE and isinstance(source.args[0], relax.Var):
            rhs, transposed = source.args[0], True
        shape = _static_shape(rhs)
        if rhs not in weights or rhs in packings or shape is None or len(shape) != 2 or rhs.ty.dtype != "float32":
            continue
        if transposed and list(source.attrs.axes or [1, 0]) != [1, 0]:
            continue
        n, k = (int(shape[0]), int(shape[1])) if transposed else (int(shape[1]), int(shape[0]))
        weight_precision = (overrides or {}).get(rhs.name, precision)
        if weight_precision != "f32" and dense_kernels.supports(weight_precision, k):
            plan = (plans or {}).get(rhs.name) if weight_precision == "int8" else None
            if plan is not None and plan.smoothing.shape != (k,):
                raise BackendError(f"tvm backend: the int8 plan of weight '{rhs.name}' has "
                                   f"{plan.smoothing.shape[0]} input channels, its matmul {k}")
            packings[rhs] = _Packing(transposed, n, k, 16, weight_precision, plan)
        else:
            packings[rhs] = _Packing(transposed, n, k, dense_lanes(n, widest) or widest)
    return packings


@relax.expr_functor.mutator
class _DenseRewriter(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule, packings: dict, tasks: int):
        super().__init__(mod)
        self.packings = packings
        self.tasks = tasks
        self.panels: dict = {}
        self.kernels: dict = {}

    def _weight_operand(self, rhs):
        """The packed weight a matmul's right operand is (W, or W^T of a linear's weight)."""
        if isinstance(rhs, relax.Var) and rhs in self.packings and not self.packings[rhs].transposed:
            return rhs
        if isinstance(rhs, relax.Var):
            bound = self.lookup_binding(rhs)
            if (isinstance(bound, relax.Call) and bound.op == _PERMUTE and bound.args[0] in self.packings
                    and self.packings[bound.args[0]].transposed):
                return bound.args[0]
        return None

    def _panels_of(self, weight) -> list:
        """The weight's panels (int8: and its column scales and sums), emitted once: matmuls and
        an embedding lookup share them."""
        if weight not in self.panels:
            p, source = self.packings[weight], weight
            if p.padded != p.n:   # GPT-2's 50257-token vocabulary: zero columns, sliced off later
                source = relax.op.nn.pad(weight, [0, p.padded - p.n, 0, 0] if p.transposed else
                                         [0, 0, 0, p.padded - p.n])
            if p.precision != "f32":
                self.panels[weight] = [self.builder_.emit(t) for t in _KERNEL_PANELS[p.precision](source, p)]
                return self.panels[weight]
            if p.transposed:   # weight [N, K] -> [N / lanes, lanes, K] -> [N / lanes, K, lanes]
                panels = relax.op.permute_dims(relax.op.reshape(source, [p.padded // p.lanes, p.lanes, p.k]), [0, 2, 1])
            else:              # weight [K, N] -> [K, N / lanes, lanes] -> [N / lanes, K, lanes]
                panels = relax.op.permute_dims(relax.op.reshape(source, [p.k, p.padded // p.lanes, p.lanes]), [1, 0, 2])
            self.panels[weight] = [self.builder_.emit(panels)]
        return self.panels[weight]

    def visit_call_(self, call):
        call = self.visit_expr_post_order(call)
        if call.op == _TAKE:
            return self._embedding(call)
        if call.op == _MATMUL:
            return self._dense(call)
        return call

    def _embedding(self, call):
        """take(W, ids, axis=0) of a weight that is also packed (a tied embedding and LM head):
        read rows from the panels, so the artifact holds the weight once."""
        weight, ids = call.args
        p = self.packings.get(weight)
        axis = call.attrs.axis
        if p is None or not p.transposed or axis is None or int(axis) != 0 or _static_shape(call) is None:
            return call
        panels = self._panels_of(weight)
        lanes = p.lanes

        def embedding_rows(index, table, *int8):
            def row(*i):
                n, k = index[i[:-1]], i[-1]
                if p.precision == "bf16":
                    return table[n // lanes, k // 2, n % lanes * 2 + k % 2].astype("float32")
                if p.precision == "int8":    # W = Wq * scale / s, the outlier channels' from their fp32 panels
                    scale, _, x_smoothing, *outlier_weights = int8
                    value = table[n // lanes, k // 4, n % lanes * 4 + k % 4].astype("float32") * scale[n] \
                        * x_smoothing[k]
                    for j, channel in enumerate(p.plan.outliers if p.plan else ()):
                        value = tirx.Select(k == channel, outlier_weights[-1][n // lanes, j, n % lanes], value)
                    return value
                return table[n // lanes, k, n % lanes]
            return te.compute((*index.shape, p.k), row, name="embedding_rows")
        return self.builder_.call_te(embedding_rows, ids, *panels)

    def _dense(self, call):
        x, rhs = call.args
        weight = self._weight_operand(rhs)
        x_shape, out_shape = _static_shape(x), _static_shape(call)
        if weight is None or x_shape is None or out_shape is None or call.ty.dtype != "float32" \
                or x.ty.dtype != "float32":
            return call
        p = self.packings[weight]
        if not isinstance(x_shape[-1], tirx.IntImm) or int(x_shape[-1]) != p.k:
            return call
        rows, static_rows = dense_kernels.leading_rows(x_shape)
        outliers = len(p.plan.outliers) if p.plan else 0
        key = (static_rows, p.k, p.padded, p.lanes, p.precision, outliers)
        if key not in self.kernels:
            m = static_rows if static_rows is not None else tirx.Var("m", "int64")
            if p.precision != "f32":
                kernel = dense_kernels.dense_call(p.precision, m, p.k, p.padded, self.tasks, outliers)
                name = f"dense_{p.precision}_{p.k}x{p.padded}"
            else:
                kernel, name = packed_dense(m, p.k, p.padded, p.lanes), f"packed_dense_{p.k}x{p.padded}"
            self.kernels[key] = self.builder_.add_func(kernel, name)
        flat = self.builder_.emit(relax.op.reshape(x, [rows, p.k]))
        out = self.builder_.emit(relax.call_tir(self.kernels[key], [flat, *self._panels_of(weight)],
                                                relax.TensorType([rows, p.padded], "float32")))
        if p.padded != p.n:
            out = self.builder_.emit(relax.op.strided_slice(out, axes=[1], begin=[0], end=[p.n]))
        return relax.op.reshape(out, out_shape)


def _interleaved(weight, p: _Packing, group: int):
    """[n, k] or [k, n] -> panels [n / 16, k / group, 16 * group]: each panel's 16 columns with
    `group` consecutive k values side by side (the layout dot-product instructions read)."""
    steps, count = p.k // group, p.padded // 16
    if p.transposed:     # [N, K] -> [N / 16, 16, K / g, g] -> [N / 16, K / g, 16, g]
        grouped = relax.op.permute_dims(relax.op.reshape(weight, [count, 16, steps, group]), [0, 2, 1, 3])
    else:                # [K, N] -> [K / g, g, N / 16, 16] -> [N / 16, K / g, 16, g]
        grouped = relax.op.permute_dims(relax.op.reshape(weight, [steps, group, count, 16]), [2, 0, 3, 1])
    return relax.op.reshape(grouped, [count, steps, 16 * group])


def _bf16_panels(weight, p: _Packing) -> list:
    """float32 -> bf16 panels [n / 16, k / 2, 32] (TVM's cast: nearest even)."""
    return [relax.op.astype(_interleaved(weight, p, 2), "bfloat16")]


def _int8_panels(weight, p: _Packing) -> list:
    """float32 -> int8 panels [n / 16, k / 4, 64] of W * s (the plan's smoothing s per input
    channel, 0 at its outlier channels; s = 1 without a plan), symmetric per output column,
    plus the columns' scales (max |w| / 127), sums of their int8 values, what the kernel
    multiplies x by (1 / s) and, with outlier channels, their indices and fp32 weights in
    panels [n / 16, outliers, 16]."""
    columns = weight if p.transposed else relax.op.permute_dims(weight, [1, 0])       # [N, K]
    smoothed = columns
    if p.plan is not None:
        smoothed = relax.op.multiply(columns, relax.const(p.plan.smoothing.reshape(1, p.k)))
    peak = relax.op.max(relax.op.abs(smoothed), axis=[1], keepdims=True)
    scale = relax.op.divide(peak, relax.const(127.0, "float32"))
    divisor = relax.op.maximum(scale, relax.const(1e-30, "float32"))                 # all-zero (padding) columns
    values = relax.op.clip(relax.op.round(relax.op.divide(smoothed, divisor)), -127, 127)
    quantized = relax.op.astype(values, "int8")
    sums = relax.op.sum(relax.op.astype(quantized, "int32"), axis=[1])
    flat = _Packing(True, p.n, p.k, p.lanes, p.precision)
    x_smoothing = p.plan.x_smoothing if p.plan is not None else np.ones(p.k, np.float32)
    panels = [_interleaved(quantized, flat, 4), relax.op.reshape(scale, [p.padded]), sums, relax.const(x_smoothing)]
    if p.plan is not None and p.plan.outliers:
        channels = relax.const(np.array(p.plan.outliers, np.int32))
        picked = relax.op.take(columns, channels, axis=1)                           # [N, outliers]
        outlier_weights = relax.op.permute_dims(
            relax.op.reshape(picked, [p.padded // 16, 16, len(p.plan.outliers)]), [0, 2, 1])
        panels += [channels, outlier_weights]
    return panels


_KERNEL_PANELS = {"bf16": _bf16_panels, "int8": _int8_panels}


@tvm.transform.module_pass(opt_level=0, name="PackDenseWeights")
class PackDenseWeights:
    """matmul(x, W) and matmul(x, W^T) with W a weight parameter -> packed_dense(x, panels(W))
    (precision "bf16" / "int8": graphopt's C kernels on that precision's panels where the shape
    allows; `overrides`: weight parameter name -> its own precision); an embedding lookup in a
    weight packed so reads the panels."""

    def __init__(self, precision: str = "f32", tasks: int = 2, int8_plans: dict | None = None, widest: int = 32,
                 overrides: dict | None = None):
        self.precision = precision
        self.overrides = overrides or {}
        self.widest = widest          # fp32 panel lanes: schedules.panel_lanes of the target
        self.tasks = tasks            # per reduced-precision matmul (dense_kernels.tasks_for)
        self.int8_plans = int8_plans or {}      # weight parameter name -> Int8Plan
        self.reduced_weights = self.fp32_weights = 0     # packed weights of each kind, after a run
        self.weights_by_precision: dict = {}     # precision -> packed weights in it, after a run
        self.packed_names: set = set()      # parameter names of the packed weights, after a run
        self.fp32_by_shape = 0        # of those in fp32, how many were to be in another (k its kernels cannot take)
        self.smoothed_weights = self.outlier_channels = 0   # int8 weights with a plan, their outliers

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        main = mod["main"]
        num_inputs = int(main.attrs["num_input"]) if main.attrs and "num_input" in main.attrs else len(main.params)
        packings = _weight_matmuls(main, set(main.params[num_inputs:]), self.precision, self.int8_plans,
                                   self.widest, self.overrides)
        self.reduced_weights = sum(p.precision != "f32" for p in packings.values())
        self.weights_by_precision = {}
        for p in packings.values():
            self.weights_by_precision[p.precision] = self.weights_by_precision.get(p.precision, 0) + 1
        self.packed_names = {w.name for w in packings}
        self.fp32_by_shape = sum(p.precision == "f32" and self.overrides.get(w.name, self.precision) != "f32"
                                 for w, p in packings.items())
        self.fp32_weights = len(packings) - self.reduced_weights
        plans = [p.plan for p in packings.values() if p.plan is not None]
        self.smoothed_weights, self.outlier_channels = len(plans), sum(len(plan.outliers) for plan in plans)
        rewriter = _DenseRewriter(mod, packings, self.tasks)
        gv = mod.get_global_var("main")
        rewriter.builder_.update_func(gv, rewriter.visit_expr(main))
        return rewriter.builder_.get()


def cpu_pipeline(target: tvm.target.Target, schedules: bool = True) -> tvm.transform.Pass:
    """TVM's CPU pipeline (relax.backend.cpu_generic) with graphopt's schedule rules after
    fusion. Without `schedules` it is TVM's stock pipeline."""
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    @tvm.transform.module_pass(opt_level=0, name="GraphoptCpuPipeline")
    def _pipeline(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        passes = cpu.library_dispatch_passes(target) + cpu.legalize_passes(target)
        if schedules:
            passes.append(dlight.ApplyDefaultSchedule(*default_rules()))
        passes += cpu.dataflow_lower_passes(target) + cpu.finalize_passes(target)
        with target:
            return tvm.transform.Sequential(passes)(mod)

    return _pipeline
