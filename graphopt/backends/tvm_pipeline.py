"""Relax-level passes of the TVM backend: weight packing for matmuls, and the CPU pipeline
(TVM's own legalize / fuse / lower passes with graphopt's schedule rules in the middle)."""
from __future__ import annotations

import tvm
from tvm import relax, tirx
from tvm.s_tir import dlight

from .tvm_schedules import default_rules, dense_lanes, packed_dense

_MATMUL = tvm.ir.Op.get("relax.matmul")
_PERMUTE = tvm.ir.Op.get("relax.permute_dims")


def _static_shape(expr) -> list | None:
    ty = getattr(expr, "ty", None)
    if not isinstance(ty, relax.TensorType) or ty.shape is None or not hasattr(ty.shape, "values"):
        return None
    return list(ty.shape.values)


@relax.expr_functor.mutator
class _DenseRewriter(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule, weights: set):
        super().__init__(mod)
        self.mod_ = mod
        self.weights = weights
        self.kernels: dict = {}
        self.rewritten = 0

    def _weight_operand(self, rhs):
        """(weight var, transposed) when `rhs` is a 2-D weight ([K, N]) or its transpose."""
        if isinstance(rhs, relax.Var) and rhs in self.weights:
            return rhs, False
        if isinstance(rhs, relax.Var):
            bound = self.lookup_binding(rhs)
            if (isinstance(bound, relax.Call) and bound.op == _PERMUTE and isinstance(bound.args[0], relax.Var)
                    and bound.args[0] in self.weights and len(_static_shape(bound.args[0]) or []) == 2):
                return bound.args[0], True
        return None, False

    def visit_call_(self, call):
        call = self.visit_expr_post_order(call)
        if call.op != _MATMUL:
            return call
        x, rhs = call.args
        weight, transposed = self._weight_operand(rhs)
        x_shape, out_shape = _static_shape(x), _static_shape(call)
        if weight is None or x_shape is None or out_shape is None or len(x_shape) < 1:
            return call
        w_shape = _static_shape(weight)
        dtype = call.ty.dtype
        if len(w_shape) != 2 or dtype != "float32" or x.ty.dtype != dtype or weight.ty.dtype != dtype:
            return call
        n, k = (int(w_shape[0]), int(w_shape[1])) if transposed else (int(w_shape[1]), int(w_shape[0]))
        if not isinstance(x_shape[-1], tirx.IntImm) or int(x_shape[-1]) != k:
            return call
        # Widths that are not a multiple of 16 (GPT-2's 50257-token vocabulary) are computed
        # on zero-padded panels, and the padding columns sliced off.
        lanes = dense_lanes(n) or 32
        padded = -(-n // lanes) * lanes
        rows = 1
        for dim in x_shape[:-1]:
            rows = rows * dim
        rows = tvm.sym.Analyzer().simplify(rows)
        static_rows = int(rows) if isinstance(rows, tirx.IntImm) else None
        key = (static_rows, k, padded, lanes)
        if key not in self.kernels:
            m = static_rows if static_rows is not None else tirx.Var("m", "int64")
            kernel = packed_dense(m, k, padded, lanes)
            self.kernels[key] = self.builder_.add_func(kernel, f"packed_dense_{k}x{padded}")
        if padded != n:
            weight = relax.op.nn.pad(weight, [0, padded - n, 0, 0] if transposed else [0, 0, 0, padded - n])
        if transposed:   # weight [N, K] -> [N / lanes, lanes, K] -> [N / lanes, K, lanes]
            panels = relax.op.reshape(weight, [padded // lanes, lanes, k])
            panels = relax.op.permute_dims(panels, [0, 2, 1])
        else:            # weight [K, N] -> [K, N / lanes, lanes] -> [N / lanes, K, lanes]
            panels = relax.op.reshape(weight, [k, padded // lanes, lanes])
            panels = relax.op.permute_dims(panels, [1, 0, 2])
        panels = self.builder_.emit(panels)
        flat = self.builder_.emit(relax.op.reshape(x, [rows, k]))
        out = self.builder_.emit(relax.call_tir(self.kernels[key], [flat, panels],
                                                relax.TensorType([rows, padded], dtype)))
        if padded != n:
            out = self.builder_.emit(relax.op.strided_slice(out, axes=[1], begin=[0], end=[n]))
        self.rewritten += 1
        return relax.op.reshape(out, out_shape)


@tvm.transform.module_pass(opt_level=0, name="PackDenseWeights")
class PackDenseWeights:
    """matmul(x, W) and matmul(x, W^T) with W a weight parameter -> packed_dense(x, panels(W))."""

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        main = mod["main"]
        num_inputs = int(main.attrs["num_input"]) if main.attrs and "num_input" in main.attrs else len(main.params)
        rewriter = _DenseRewriter(mod, set(main.params[num_inputs:]))
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
