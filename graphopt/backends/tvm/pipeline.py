"""Relax-level passes of the TVM backend: weight packing for matmuls (and embedding lookups
in the same weights), and the CPU pipeline (TVM's own legalize / fuse / lower passes with
graphopt's schedule rules in the middle)."""
from __future__ import annotations

from dataclasses import dataclass

import tvm
from tvm import relax, te, tirx
from tvm.s_tir import dlight

from . import bf16
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
    bf16: bool = False    # bf16 panels [padded / 16, k / 2, 32] for graphopt's bf16 kernel (bf16.py)

    @property
    def padded(self) -> int:
        return -(-self.n // self.lanes) * self.lanes


def _weight_matmuls(main: relax.Function, weights: set, use_bf16: bool = False) -> dict:
    """Weight var -> its packing, for every float32 2-D weight some matmul reads as W or W^T;
    with `use_bf16`, bf16 panels wherever the bf16 kernel takes the shape."""
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
        if use_bf16 and bf16.supports(k, n):
            packings[rhs] = _Packing(transposed, n, k, 16, bf16=True)
        else:
            packings[rhs] = _Packing(transposed, n, k, dense_lanes(n) or 32)
    return packings


@relax.expr_functor.mutator
class _DenseRewriter(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule, packings: dict):
        super().__init__(mod)
        self.packings = packings
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

    def _panels_of(self, weight):
        """The weight's panels, emitted once: matmuls and an embedding lookup share them."""
        if weight not in self.panels:
            p, source = self.packings[weight], weight
            if p.padded != p.n:   # GPT-2's 50257-token vocabulary: zero columns, sliced off later
                source = relax.op.nn.pad(weight, [0, p.padded - p.n, 0, 0] if p.transposed else
                                         [0, 0, 0, p.padded - p.n])
            if p.bf16:
                panels = _bf16_panels(source, p)
            elif p.transposed:   # weight [N, K] -> [N / lanes, lanes, K] -> [N / lanes, K, lanes]
                panels = relax.op.permute_dims(relax.op.reshape(source, [p.padded // p.lanes, p.lanes, p.k]), [0, 2, 1])
            else:              # weight [K, N] -> [K, N / lanes, lanes] -> [N / lanes, K, lanes]
                panels = relax.op.permute_dims(relax.op.reshape(source, [p.k, p.padded // p.lanes, p.lanes]), [1, 0, 2])
            self.panels[weight] = self.builder_.emit(panels)
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

        def embedding_rows(table, index):
            if p.bf16:
                return te.compute((*index.shape, p.k), lambda *i: table[
                    index[i[:-1]] // lanes, i[-1] // 2, index[i[:-1]] % lanes * 2 + i[-1] % 2].astype("float32"),
                    name="embedding_rows")
            return te.compute((*index.shape, p.k), lambda *i: table[index[i[:-1]] // lanes, i[-1],
                                                                    index[i[:-1]] % lanes], name="embedding_rows")
        return self.builder_.call_te(embedding_rows, panels, ids)

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
        rows = 1
        for dim in x_shape[:-1]:
            rows = rows * dim
        rows = tvm.sym.Analyzer().simplify(rows)
        static_rows = int(rows) if isinstance(rows, tirx.IntImm) else None
        key = (static_rows, p.k, p.padded, p.lanes, p.bf16)
        if key not in self.kernels:
            m = static_rows if static_rows is not None else tirx.Var("m", "int64")
            if p.bf16:
                kernel, name = bf16.dense_bf16(m, p.k, p.padded), f"dense_bf16_{p.k}x{p.padded}"
            else:
                kernel, name = packed_dense(m, p.k, p.padded, p.lanes), f"packed_dense_{p.k}x{p.padded}"
            self.kernels[key] = self.builder_.add_func(kernel, name)
        flat = self.builder_.emit(relax.op.reshape(x, [rows, p.k]))
        out = self.builder_.emit(relax.call_tir(self.kernels[key], [flat, self._panels_of(weight)],
                                                relax.TensorType([rows, p.padded], "float32")))
        if p.padded != p.n:
            out = self.builder_.emit(relax.op.strided_slice(out, axes=[1], begin=[0], end=[p.n]))
        return relax.op.reshape(out, out_shape)


def _bf16_panels(weight, p: _Packing):
    """[n, k] or [k, n] float32 -> bf16 panels [n / 16, k / 2, 32]: (column, k pair) interleaved."""
    half, count = p.k // 2, p.padded // 16
    if p.transposed:     # [N, K] -> [N / 16, 16, K / 2, 2] -> [N / 16, K / 2, 16, 2]
        pairs = relax.op.permute_dims(relax.op.reshape(weight, [count, 16, half, 2]), [0, 2, 1, 3])
    else:                # [K, N] -> [K / 2, 2, N / 16, 16] -> [N / 16, K / 2, 16, 2]
        pairs = relax.op.permute_dims(relax.op.reshape(weight, [half, 2, count, 16]), [2, 0, 3, 1])
    return relax.op.astype(relax.op.reshape(pairs, [count, half, 32]), "bfloat16")


@tvm.transform.module_pass(opt_level=0, name="PackDenseWeights")
class PackDenseWeights:
    """matmul(x, W) and matmul(x, W^T) with W a weight parameter -> packed_dense(x, panels(W))
    (precision "bf16": dense_bf16 on bf16 panels where the shape allows); an embedding lookup
    in a weight packed so reads the panels."""

    def __init__(self, precision: str = "f32"):
        self.precision = precision
        self.bf16_weights = self.fp32_weights = 0     # packed weights of each kind, after a run

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        main = mod["main"]
        num_inputs = int(main.attrs["num_input"]) if main.attrs and "num_input" in main.attrs else len(main.params)
        packings = _weight_matmuls(main, set(main.params[num_inputs:]), self.precision == "bf16")
        self.bf16_weights = sum(p.bf16 for p in packings.values())
        self.fp32_weights = len(packings) - self.bf16_weights
        rewriter = _DenseRewriter(mod, packings)
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
