"""graphopt's float32 C kernels on the TVM backend: attention and RMSNorm, each one call instead
of the ops they decompose into.

- graphopt.attention (kernels/attention.c): `prepare.grouped_attention` turns
  scaled_dot_product_attention nodes the kernel takes into it (looking through Hugging Face's
  repeat_kv, so grouped key/value heads are read in place); it runs as a parallel loop over
  tasks, each calling graphopt_attention for its share of (batch, head, 16-row block) units,
  instead of two matmuls, a masked softmax and the key/value copies.
- graphopt.rms_norm (kernels/rms_norm.c): `prepare.fused_rms_norms` matches Hugging Face's
  RMSNorm; one pass per row instead of a square, a scalar mean and three elementwise ops; the
  residual add before a norm goes into the same call (graphopt.residual_rms_norm).

Products, softmax and sums stay float32. The kernels are compiled for the target: AVX-512, or
AVX2 with FMA (`F32_KERNELS`); a target with neither gets TVM's own ops, and a graph prepared
for the kernels lowers to Relax ops there.
"""
from __future__ import annotations

from .dense_kernels import F32_KERNELS, kernel_for, leading_rows
from .kv_attention import convert_kv_attention
from .schedules import OPAQUE_PATTERN

ROW_BLOCK = 16           # query rows per unit of work (kernels/attention.c)
UNITS_PER_TASK = 4       # tasks = units / 4, at most `tasks` (the parallel loop's extent)


def float32_kernel(features) -> str | None:
    """The float32 kernel code for CPU `features` may use, or None (then TVM's own lowering)."""
    return kernel_for("f32", features, table=F32_KERNELS)


def kernel_takes(query, key, value, mask) -> bool:
    """Whether the kernel computes attention of these (fake) tensors: float32, rank 4, one batch
    size, head sizes multiples of 16, whole groups of query heads per key/value head, a bool or
    float32 mask."""
    import torch
    tensors = (query, key, value)
    if any(t is None or t.dtype != torch.float32 or t.dim() != 4 for t in tensors):
        return False
    dims = [query.shape[1], key.shape[1], value.shape[1], query.shape[3], key.shape[3], value.shape[3]]
    if not all(isinstance(d, int) for d in dims):
        return False
    heads, kv_heads, v_heads, d, dk, dv = dims
    if kv_heads != v_heads or heads % kv_heads or d != dk or d % 16 or dv % 16:
        return False
    if len({str(t.shape[0]) for t in tensors}) != 1:       # key/value broadcast over the batch
        return False
    return mask is None or (mask.dtype in (torch.bool, torch.float32) and mask.dim() <= 4)


class Float32Converters:
    """The Relax conversions of graphopt.attention and graphopt.rms_norm for one import (`kernel`
    from float32_kernel; None: Relax ops)."""

    def __init__(self, kernel: str | None, tasks: int):
        self.kernel = kernel
        self.tasks = tasks
        self.used = False

    def convert_map(self) -> dict:
        return {"attention.default": self.attention, "rms_norm.default": self.rms_norm,
                "residual_rms_norm.default": self.residual_rms_norm, "kv_attention.default": self.kv_attention}

    def kv_attention(self, node, importer):
        result = convert_kv_attention(node, importer, self.kernel, self.tasks)
        self.used = True
        return result

    def residual_rms_norm(self, node, importer):
        return self._norm(node, importer, residual=True)

    def rms_norm(self, node, importer):
        return self._norm(node, importer, residual=False)

    def _norm(self, node, importer, residual: bool):
        """rms_norm(x, weight, eps) or residual_rms_norm(x, residual, weight, eps) -> (x + residual,
        its norm): the kernel, or Relax ops without one."""
        from tvm import relax, tirx
        builder = importer.block_builder
        inputs = [importer.env[a] for a in node.args[:2 + residual]]
        eps = float(node.args[2 + residual])
        x = builder.emit(relax.op.add(inputs[0], inputs[1])) if residual and self.kernel is None else inputs[0]
        if self.kernel is None:
            squares = relax.op.mean(relax.op.multiply(x, x), axis=[-1], keepdims=True)
            inverse = relax.op.rsqrt(relax.op.add(squares, relax.const(eps, "float32")))
            normalized = builder.emit(relax.op.multiply(inputs[-1], relax.op.multiply(x, inverse)))
            return builder.emit(relax.Tuple([x, normalized])) if residual else normalized
        self.used = True
        shape = list(x.ty.shape.values)
        (rows, static_rows), width = leading_rows(shape), int(shape[-1])
        func = rms_norm_call(static_rows if static_rows is not None else tirx.Var("rows", "int64"), width, eps,
                             self.tasks, residual=residual)
        flat = [builder.emit(relax.op.reshape(t, [rows, width])) for t in inputs[:-1]]
        outputs = [relax.TensorType([rows, width], "float32")] * (1 + residual)
        out = builder.emit(relax.call_tir(builder.add_func(func, "rms_norm"), [*flat, inputs[-1]],
                                          outputs if residual else outputs[0]))
        if not residual:
            return builder.emit(relax.op.reshape(out, shape))
        return builder.emit(relax.Tuple([builder.emit(relax.op.reshape(relax.TupleGetItem(out, i), shape))
                                         for i in range(2)]))

    def attention(self, node, importer):
        from tvm import relax
        if self.kernel is None:          # a graph prepared for another target: TVM's own ops
            return _relax_attention(node, importer)
        self.used = True
        query, key, value = (importer.env[a] for a in node.args[:3])
        mask = importer.env[node.args[3]] if node.args[3] is not None else None
        tables = [importer.env[a] for a in node.args[6:8] if a is not None]
        inputs = [query, key, value] + ([mask] if mask is not None else []) + tables
        func = attention_call(*[_shape_of(t) for t in inputs[:3]], mask_shape=_shape_of(mask) if mask is not None
                              else None, mask_dtype=str(mask.ty.dtype) if mask is not None else None,
                              causal=bool(node.args[4]), scale=float(node.args[5]), tasks=self.tasks,
                              rotary_shape=_shape_of(tables[0]) if tables else None)
        builder = importer.block_builder
        q_shape, v_shape = list(query.ty.shape.values), list(value.ty.shape.values)
        out = relax.TensorType([*q_shape[:3], v_shape[3]], "float32")
        return builder.emit(relax.call_tir(builder.add_func(func, "attention"), inputs, out))


def _relax_attention(node, importer):
    """graphopt.attention in Relax ops: key/value heads repeated, scores, mask, softmax (rows
    that attend nothing: zeros, as torch), values."""
    import numpy as np
    import torch
    from tvm import relax
    emit = importer.block_builder.emit
    query, key, value = (importer.env[a] for a in node.args[:3])
    mask, causal, scale = node.args[3], bool(node.args[4]), float(node.args[5])
    if len(node.args) > 7 and node.args[6] is not None:
        cos, sin = importer.env[node.args[6]], importer.env[node.args[7]]
        query, key = (emit(_relax_rotate(t, cos, sin)) for t in (query, key))
    heads, kv_heads = int(query.ty.shape.values[1]), int(key.ty.shape.values[1])
    if heads != kv_heads:
        key = emit(relax.op.repeat(key, heads // kv_heads, axis=1))
        value = emit(relax.op.repeat(value, heads // kv_heads, axis=1))
    scores = emit(relax.op.multiply(relax.op.matmul(query, relax.op.permute_dims(key, [0, 1, 3, 2])),
                                    relax.const(scale, "float32")))
    allowed = None
    if causal:
        rows, keys = node.args[0].meta["val"].shape[2], node.args[1].meta["val"].shape[2]
        allowed = relax.const(np.tril(np.ones((rows, keys), bool)))
    if mask is not None and node.args[3].meta["val"].dtype == torch.bool:
        allowed = importer.env[mask]
    elif mask is not None:
        scores = emit(relax.op.add(scores, importer.env[mask]))
    if allowed is not None:
        scores = emit(relax.op.where(allowed, scores, relax.const(float("-inf"), "float32")))
    lowest = float(np.finfo(np.float32).min)       # TVM's max starts there, not at -inf
    attends = emit(relax.op.greater(relax.op.max(scores, axis=[-1], keepdims=True), relax.const(lowest, "float32")))
    probabilities = emit(relax.op.where(attends, relax.op.nn.softmax(scores, axis=-1), relax.const(0.0, "float32")))
    return emit(relax.op.matmul(probabilities, value))


def _relax_rotate(x, cos, sin):
    """x cos + rotate_half(x) sin in Relax ops (graphopt.ir.attention.rotate)."""
    from tvm import relax
    depth = int(x.ty.shape.values[-1])
    first = relax.op.strided_slice(x, axes=[-1], begin=[0], end=[depth // 2])
    second = relax.op.strided_slice(x, axes=[-1], begin=[depth // 2], end=[depth])
    rotated = relax.op.concat([relax.op.negative(second), first], axis=-1)
    return relax.op.add(relax.op.multiply(x, cos), relax.op.multiply(rotated, sin))


def _shape_of(tensor) -> list:
    """A Relax tensor's dims: ints where static, fresh int64 TIR vars where symbolic (bound by
    the PrimFunc's buffers when it is called)."""
    from tvm import tirx
    dims = []
    for i, dim in enumerate(tensor.ty.shape.values):
        dims.append(int(dim) if isinstance(dim, tirx.IntImm) else tirx.Var(f"n{i}", "int64"))
    return dims


def _mask_strides(shape: list) -> list:
    """Element strides of a contiguous mask per (batch, head, row, column), 0 where it broadcasts."""
    from tvm import tirx
    strides, step = [], tirx.const(1, "int64")
    for dim in reversed([1] * (4 - len(shape)) + list(shape)):
        strides.append(tirx.const(0, "int64") if isinstance(dim, int) and dim == 1 else step)
        step = step * (tirx.const(dim, "int64") if isinstance(dim, int) else dim)
    return strides[::-1]


def attention_call(q_shape: list, k_shape: list, v_shape: list, *, mask_shape: list | None, mask_dtype: str | None,
                   causal: bool, scale: float, tasks: int, rotary_shape: list | None = None):
    """The TIR function out [B, Hq, Lq, Dv] = attention(q, k, v[, mask]): a parallel loop over
    tasks, each calling graphopt_attention for its share of the units."""
    import tvm
    from tvm import te, tirx
    placeholders = [te.placeholder(q_shape, "float32", name="query"), te.placeholder(k_shape, "float32", name="key"),
                    te.placeholder(v_shape, "float32", name="value")]
    if mask_shape is not None:
        placeholders.append(te.placeholder(mask_shape, mask_dtype, name="mask"))
    if rotary_shape is not None:
        placeholders += [te.placeholder(rotary_shape, "float32", name=name) for name in ("cos", "sin")]
        shared = isinstance(rotary_shape[0], int) and rotary_shape[0] == 1
        rows, depth = (tirx.const(d, "int64") if isinstance(d, int) else d for d in rotary_shape[2:])
        rotary_batch_stride = tirx.const(0, "int64") if shared else rows * depth
    sizes = [tirx.Cast("int64", d) if isinstance(d, tirx.Var) else tirx.const(d, "int64") for d in
             (q_shape[0], q_shape[1], k_shape[1], q_shape[2], k_shape[2], q_shape[3], v_shape[3])]
    units = sizes[0] * sizes[1] * ((sizes[3] + ROW_BLOCK - 1) // ROW_BLOCK)
    count = tvm.sym.Analyzer().simplify(tirx.max(tirx.min((units + UNITS_PER_TASK - 1) // UNITS_PER_TASK, tasks), 1))
    kind = 0 if mask_shape is None else 1 if mask_dtype == "bool" else 2
    strides = _mask_strides(mask_shape) if mask_shape is not None else [tirx.const(0, "int64")] * 4

    def body(ins, outs):
        # an int32 loop variable, cast: an int64 one reaches the C side narrowed (dense_kernels.parallel_extern)
        task = tirx.Var("task", "int32")
        pointers = [t.access_ptr("r") for t in ins[:3]]
        mask_pointer = ins[3].access_ptr("r") if mask_shape is not None else ins[0].access_ptr("r")
        if rotary_shape is not None:     # (else any valid pointers: the kernel does not read them)
            rotary = [ins[-2].access_ptr("r"), ins[-1].access_ptr("r"), tirx.const(1, "int64"), rotary_batch_stride]
        else:
            rotary = [ins[0].access_ptr("r"), ins[0].access_ptr("r"), tirx.const(0, "int64"), tirx.const(0, "int64")]
        call = tirx.call_extern("int32", "graphopt_attention", *pointers, mask_pointer, outs[0].access_ptr("w"),
                                *sizes, tirx.const(kind, "int64"), *strides, tirx.const(int(causal), "int64"),
                                tirx.const(scale, "float32"), *rotary, tirx.Cast("int64", task), count)
        extent = tirx.const(int(count), "int32") if isinstance(count, tirx.IntImm) else tirx.Cast("int32", count)
        return tirx.For(task, tirx.const(0, "int32"), extent, tirx.ForKind.PARALLEL, tirx.Evaluate(call))

    out = te.extern([*q_shape[:3], v_shape[3]], placeholders, body, name="attention", dtype="float32")
    func = te.create_prim_func([*placeholders, out])
    return (func.with_attr("tirx.is_scheduled", True).with_attr("op_pattern", OPAQUE_PATTERN)
            .without_attr("global_symbol"))


def rms_norm_kernel_takes(x, weight) -> bool:
    """Whether the kernel normalizes these (fake) tensors: float32, a static last dim that is a
    multiple of 16, a weight of that many floats."""
    import torch
    return (x is not None and weight is not None and x.dtype == weight.dtype == torch.float32
            and isinstance(x.shape[-1], int) and x.shape[-1] % 16 == 0 and tuple(weight.shape) == (x.shape[-1],))


def rms_norm_call(rows, width: int, eps: float, tasks: int, residual: bool = False):
    """The TIR function y[rows, width] = graphopt_rms_norm(x, weight) from a parallel loop over
    tasks; with `residual`, (sum, y) = graphopt_residual_rms_norm(x, residual, weight)."""
    from tvm import te, tirx
    inputs = [te.placeholder((rows, width), "float32", name=name) for name in ("x", "residual")[:1 + residual]]
    inputs.append(te.placeholder((width,), "float32", name="weight"))
    count = min(tasks, rows) if isinstance(rows, int) else tasks
    symbol = "graphopt_residual_rms_norm" if residual else "graphopt_rms_norm"

    def body(ins, outs):
        task = tirx.Var("task", "int32")       # int32, cast: see dense_kernels.parallel_extern
        sizes = [tirx.Cast("int64", rows) if not isinstance(rows, int) else tirx.const(rows, "int64"),
                 tirx.const(width, "int64"), tirx.const(eps, "float32")]
        call = tirx.call_extern("int32", symbol, *[t.access_ptr("r") for t in ins],
                                *[t.access_ptr("w") for t in outs], *sizes, tirx.Cast("int64", task),
                                tirx.const(count, "int64"))
        return tirx.For(task, tirx.const(0, "int32"), tirx.const(count, "int32"), tirx.ForKind.PARALLEL,
                        tirx.Evaluate(call))

    shapes = [(rows, width)] * (1 + residual)
    outs = te.extern(shapes, inputs, body, name="rms_norm", dtype=["float32"] * len(shapes))
    outs = outs if isinstance(outs, list) else [outs]
    func = te.create_prim_func([*inputs, *outs])
    return (func.with_attr("tirx.is_scheduled", True).with_attr("op_pattern", OPAQUE_PATTERN)
            .without_attr("global_symbol"))
