"""graphopt.kv_attention on the TVM backend: attention over a preallocated KV cache that the call
writes in place (kernels/kv_attention.c), which makes text-generation graphs run on TVM.

The Relax call is `call_tir_inplace`: its present_key / present_value outputs are the past
buffers it was given, so a runtime that passes the same buffers every step has no copy of the
cache per token. One PrimFunc, two parallel loops over tasks: the new keys (rotated) and values
into the cache, then each query row against its row's positions. The key cache is stored
transposed per head ([batch, kv_heads, head_dim, capacity] in the buffer the graph declares as
[batch, kv_heads, capacity, head_dim]; the runtime only allocates it): the kernel's score tiles
read it without a transpose per call. float32 caches only.
"""
from __future__ import annotations

from ...errors import BackendError
from .schedules import OPAQUE_PATTERN

ROW_BLOCK = 16            # query rows per unit of work (kernels/kv_attention.c)


def convert_kv_attention(node, importer, kernel: str | None, tasks: int):
    """The Relax call of graphopt.kv_attention `node` (`kernel`: the float32 kernel build, or None
    where the target has none: refused)."""
    from tvm import relax
    name = f"node '{node.name}' (graphopt.kv_attention)"
    if kernel is None:
        raise BackendError(f"tvm backend: {name} needs graphopt's float32 kernels (AVX-512 or AVX2 with FMA), "
                           "which this target has not; use backend='onnxruntime'")
    query, key, value, past_key, past_value, seqlens_k, total_length = (importer.env[a] for a in node.args[:7])
    heads, kv_heads, scale = int(node.args[7]), int(node.args[8]), float(node.args[9])
    tables = [importer.env[a] for a in node.args[10:12] if a is not None]
    for label, tensor in (("query", query), ("key", key), ("value", value), ("past_key", past_key),
                          ("past_value", past_value)) + tuple(zip(("cos_cache", "sin_cache"), tables)):
        if str(tensor.ty.dtype) != "float32":
            raise BackendError(f"tvm backend: {name}: {label} is {tensor.ty.dtype}; the kernel takes float32 "
                               "(compile with cache_dtype='float32' for TVM)")
    depth = past_key.ty.shape.values[3]
    if not _static(depth) or int(depth) % 16:
        raise BackendError(f"tvm backend: {name}: head size {depth} is not a multiple of 16")
    func = kv_attention_call([_dims(t) for t in (query, key, value, past_key, past_value)],
                             _dims(tables[0]) if tables else None, heads, kv_heads, scale, tasks)
    builder = importer.block_builder
    inputs = [query, key, value, past_key, past_value, seqlens_k, total_length] + tables
    out = relax.TensorType(list(query.ty.shape.values), "float32")
    result = builder.emit(relax.call_tir_inplace(builder.add_func(func, "kv_attention"), inputs, [-1, 3, 4],
                                                 [out, past_key.ty, past_value.ty]))
    return builder.emit(relax.Tuple([builder.emit(relax.TupleGetItem(result, i)) for i in range(3)]))


def _static(dim) -> bool:
    from tvm import tirx
    return isinstance(dim, (int, tirx.IntImm))


def _dims(tensor) -> list:
    """A Relax tensor's dims: ints where static, fresh int64 TIR vars where symbolic."""
    from tvm import tirx
    return [int(d) if _static(d) else tirx.Var(f"n{i}", "int64") for i, d in enumerate(tensor.ty.shape.values)]


def kv_attention_call(shapes: list, rotary_shape: list | None, heads: int, kv_heads: int, scale: float, tasks: int):
    """The TIR function (out, key cache, value cache) = kv_attention(q, k, v, caches, seqlens_k,
    total_length[, cos, sin]): graphopt_kv_write then graphopt_kv_attend, each from a parallel
    loop over tasks. Its parameters: the inputs, then `out` (the caches are written in place)."""
    import tvm
    from tvm import te, tirx
    q_shape, k_shape, v_shape, key_shape, value_shape = shapes
    placeholders = [te.placeholder(s, "float32", name=n) for s, n in
                    zip(shapes, ("query", "key", "value", "key_cache", "value_cache"))]
    placeholders += [te.placeholder([q_shape[0]], "int32", name="seqlens_k"),
                     te.placeholder([], "int32", name="total_length")]
    if rotary_shape is not None:
        placeholders += [te.placeholder(rotary_shape, "float32", name=n) for n in ("cos", "sin")]

    def size(dim):
        return tirx.Cast("int64", dim) if isinstance(dim, tirx.Var) else tirx.const(dim, "int64")
    batch, seq, capacity, depth = size(q_shape[0]), size(q_shape[1]), size(key_shape[2]), size(key_shape[3])
    simplify = tvm.sym.Analyzer().simplify

    def task_count(units):
        return simplify(tirx.max(tirx.min(units, tasks), 1))
    write_tasks = task_count(batch * kv_heads)
    attend_tasks = task_count(batch * heads * ((seq + ROW_BLOCK - 1) // ROW_BLOCK))

    def parallel(count, call_of):
        task = tirx.Var("task", "int32")      # int32, cast: see dense_kernels.parallel_extern
        extent = tirx.const(int(count), "int32") if isinstance(count, tirx.IntImm) else tirx.Cast("int32", count)
        return tirx.For(task, tirx.const(0, "int32"), extent, tirx.ForKind.PARALLEL,
                        tirx.Evaluate(call_of(tirx.Cast("int64", task), count)))

    def body(ins, outs):
        q, k, v, keys, values, seqlens, total = ins[:7]
        if rotary_shape is not None:
            rotary = [ins[7].access_ptr("r"), ins[8].access_ptr("r"), tirx.const(1, "int64"),
                      tirx.const(rotary_shape[0], "int64")]
        else:                            # any valid pointers: the kernel does not read them
            rotary = [q.access_ptr("r"), q.access_ptr("r"), tirx.const(0, "int64"), tirx.const(1, "int64")]
        cache = [keys.access_ptr("rw"), values.access_ptr("rw")]
        lengths = [seqlens.access_ptr("r"), total.access_ptr("r")]
        write = parallel(write_tasks, lambda task, count: tirx.call_extern(
            "int32", "graphopt_kv_write", k.access_ptr("r"), v.access_ptr("r"), *cache, *lengths, *rotary[:2],
            batch, seq, tirx.const(kv_heads, "int64"), capacity, depth, *rotary[2:], task, count))
        attend = parallel(attend_tasks, lambda task, count: tirx.call_extern(
            "int32", "graphopt_kv_attend", q.access_ptr("r"), *cache, *lengths, *rotary[:2], outs[0].access_ptr("w"),
            batch, seq, tirx.const(heads, "int64"), tirx.const(kv_heads, "int64"), capacity, depth,
            tirx.const(scale, "float32"), *rotary[2:], task, count))
        return tirx.SeqStmt([write, attend])

    out = te.extern(q_shape, placeholders, body, name="kv_attention", dtype="float32")
    func = te.create_prim_func([*placeholders, out])
    return (func.with_attr("tirx.is_scheduled", True).with_attr("op_pattern", OPAQUE_PATTERN)
            .without_attr("global_symbol"))
