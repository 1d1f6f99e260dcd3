"""Block-quantized weights on the TVM backend: Relax conversions of graphopt's matmul_nbits and
embedding_nbits (4- and 8-bit codes, float32 or float16 scales, optional zero points).

The codes stay 4 or 8 bits in the artifact. A lifted transform (run once at compile time)
reorders them into 16-column panels [n / 16, k_blocks / 2, 16 * bits / 4] (a row: each
column's codes for an even and the next odd k), and the scales and zero points into
[n / 16, blocks, 16]. matmul_nbits calls graphopt_dense_nbits (kernels/dense_bf16.c), which
dequantizes four panels at a time to bf16 in a per-thread buffer and multiplies them with the
bf16 kernels (AMX-BF16 or AVX512-BF16): the products are in bf16, the sums in fp32. Up to four
rows of X (decode steps) it reads the codes in place instead: 4-bit codes become bf16 values
by OR-ing in exponent bits and meet X rounded to bf16 in vdpbf16ps (the weights exact), 8-bit
codes are converted to float32 and multiplied in fp32. embedding_nbits reads rows from the same
reordered codes, so a tied embedding and LM head keep one copy. A CPU without a bf16 kernel gets
a one-line error naming the op.
"""
from __future__ import annotations

from ...errors import BackendError
from .dense_kernels import leading_rows, parallel_extern


class QuantizedConverters:
    """The converters for one import (they share the reordered weights, keyed by parameter)."""

    def __init__(self, kernel: str | None, tasks: int):
        self.kernel = kernel
        self.tasks = tasks
        self.layouts: dict = {}
        self.kernels: dict = {}
        self.used = False

    def convert_map(self) -> dict:
        return {"matmul_nbits.default": self.matmul_nbits, "matmul_nbits_minimum.default": self.matmul_nbits_minimum,
                "embedding_nbits.default": self.embedding_nbits}

    def _layout(self, importer, key: tuple, packed, scales, zero_points, bits: int, block_size: int, name: str,
                minimums=None):
        """(codes, scales, zero points or minimums or None, n, padded n, blocks) in panel order,
        emitted once per weight (`key`: the nodes of its codes, scales and zero points / minimums)."""
        from tvm import relax
        if key in self.layouts:
            return self.layouts[key]
        if bits not in (4, 8):
            raise BackendError(f"tvm backend: {bits}-bit weights in node '{name}' are not supported (4 or 8)")
        emit = importer.block_builder.emit
        n, blocks = (int(v) for v in packed.ty.shape.values[:2])
        padded, pairs = -(-n // 16) * 16, blocks * block_size // 2
        codes = relax.op.reshape(packed, [n, pairs, bits // 4])
        if padded != n:
            codes = relax.op.nn.pad(codes, [0, padded - n, 0, 0, 0, 0])
        codes = relax.op.permute_dims(relax.op.reshape(codes, [padded // 16, 16, pairs, bits // 4]), [0, 2, 1, 3])
        codes = emit(relax.op.reshape(codes, [padded // 16, pairs, 16 * bits // 4]))

        def panel_order(table):          # [n, blocks] -> [n / 16, blocks, 16]
            if padded != n:
                table = relax.op.nn.pad(table, [0, padded - n, 0, 0])
            return emit(relax.op.permute_dims(relax.op.reshape(table, [padded // 16, 16, blocks]), [0, 2, 1]))

        scale_table = panel_order(relax.op.reshape(scales, [n, blocks]))
        zeros = None
        if minimums is not None:
            zeros = panel_order(relax.op.reshape(minimums, [n, blocks]))
        elif int(zero_points.ty.shape.values[0]) > 0:
            table = emit(relax.op.reshape(zero_points, [n, -1]))
            if bits == 4:                # two per byte, low nibble first
                low = emit(relax.op.bitwise_and(table, relax.const(15, "uint8")))
                high = emit(relax.op.right_shift(table, relax.const(4, "uint8")))
                table = emit(relax.op.reshape(emit(relax.op.stack([low, high], axis=2)), [n, -1]))
                table = relax.op.strided_slice(table, axes=[1], begin=[0], end=[blocks])
            zeros = panel_order(table)
        self.layouts[key] = (codes, scale_table, zeros, n, padded, blocks)
        return self.layouts[key]

    def matmul_nbits(self, node, importer):
        return self._matmul(node, importer, minimums=False)

    def matmul_nbits_minimum(self, node, importer):
        return self._matmul(node, importer, minimums=True)

    def _matmul(self, node, importer, minimums: bool):
        from tvm import relax, tirx
        if self.kernel is None:
            raise BackendError(f"tvm backend: node '{node.name}' (graphopt.{node.target.__name__.split('.')[0]}) needs "
                               "a bf16 kernel (AMX-BF16 or AVX512-BF16), which this target has not; "
                               "use backend='onnxruntime'")
        self.used = True
        x = importer.env[node.args[0]]
        sources = (node.args[1], _before_float32_cast(node.args[2]), node.args[3])
        packed, scales, table = (importer.env[a] for a in sources)
        bits, block_size, k = (int(v) for v in node.args[4:7])
        codes, scale_table, zeros, n, padded, blocks = self._layout(
            importer, sources, packed, scales, None if minimums else table, bits, block_size, node.name,
            minimums=table if minimums else None)
        kind = None if zeros is None else "minimums" if minimums else "zeros"
        shape = list(x.ty.shape.values)
        rows, static_rows = leading_rows(shape)
        if minimums and str(table.ty.dtype) != str(scales.ty.dtype):
            raise BackendError(f"tvm backend: node '{node.name}': minimums in {table.ty.dtype}, scales in "
                               f"{scales.ty.dtype}; the kernel reads both in one type")
        key = (static_rows, k, padded, bits, block_size, blocks, str(scales.ty.dtype), kind)
        if key not in self.kernels:
            m = static_rows if static_rows is not None else tirx.Var("m", "int64")
            self.kernels[key] = importer.block_builder.add_func(
                dense_nbits_call(m, k, padded, bits, block_size, blocks, str(scales.ty.dtype), kind, self.tasks),
                f"dense_nbits{bits}_{k}x{padded}")
        emit = importer.block_builder.emit
        flat = emit(relax.op.reshape(x, [rows, k]))
        args = [flat, codes, scale_table] + ([zeros] if zeros is not None else [])
        out = emit(relax.call_tir(self.kernels[key], args, relax.TensorType([rows, padded], "float32")))
        if padded != n:
            out = emit(relax.op.strided_slice(out, axes=[1], begin=[0], end=[n]))
        return emit(relax.op.reshape(out, [*shape[:-1], n]))

    def embedding_nbits(self, node, importer):
        from tvm import te
        indices = importer.env[node.args[0]]
        packed, scales, zero_points = (importer.env[a] for a in node.args[1:4])
        bits, block_size, k = (int(v) for v in node.args[4:7])
        codes, scale_table, zeros, _, _, _ = self._layout(importer, tuple(node.args[1:4]), packed, scales,
                                                          zero_points, bits, block_size, node.name)

        def rows(index, codes, scale, *zero):
            def value(*i):
                n, col = index[i[:-1]].astype("int64"), i[-1]
                if bits == 4:
                    byte = codes[n // 16, col // 2, n % 16].astype("int32")
                    code = (byte >> (col % 2 * 4).astype("int32")) & 15
                else:
                    code = codes[n // 16, col // 2, n % 16 * 2 + col % 2].astype("int32")
                at = (n // 16, col // block_size, n % 16)
                offset = zero[0][at].astype("float32") if zero else float(1 << (bits - 1))
                return (code.astype("float32") - offset) * scale[at].astype("float32")
            return te.compute((*index.shape, k), value, name="embedding_nbits")
        builder = importer.block_builder
        return builder.emit(builder.call_te(rows, indices, codes, scale_table, *([zeros] if zeros is not None else [])))


def _before_float32_cast(node):
    """The float16 scales a float32 cast reads (the kernel reads float16 scales itself: the
    cast would be lifted into a float32 copy of the table, twice its bytes), else `node`."""
    import torch
    if (getattr(node, "target", None) is torch.ops.aten._to_copy.default and len(node.args) == 1
            and node.kwargs.get("dtype") == torch.float32 and set(node.kwargs) <= {"dtype"}
            and node.args[0].meta["val"].dtype == torch.float16):
        return node.args[0]
    return node


def dense_nbits_call(m, k: int, n: int, bits: int, block_size: int, blocks: int, scale_dtype: str,
                     table: str | None, tasks: int):
    """The TIR function Y[m, n] = X[m, k] @ W^T for reordered block-quantized W; `m` an int or a
    tirx.Var; `table`: None, "zeros" (uint8 zero points) or "minimums" (in the scales' type)."""
    from tvm import te, tirx
    pairs = blocks * block_size // 2
    weights = [te.placeholder((n // 16, pairs, 16 * bits // 4), "uint8", name="codes"),
               te.placeholder((n // 16, blocks, 16), scale_dtype, name="scales")]
    if table is not None:
        weights.append(te.placeholder((n // 16, blocks, 16), "uint8" if table == "zeros" else scale_dtype, name=table))
    flags = (1 if scale_dtype == "float16" else 0) | {None: 0, "zeros": 2, "minimums": 4}[table]

    def arguments(ins, y):
        zeros = ins[3 if table else 2].access_ptr("r")      # flags say whether the kernel reads it
        sizes = [tirx.Cast("int64", m)] + [tirx.const(v, "int64") for v in (k, n, bits, block_size, blocks, flags)]
        return [ins[0].access_ptr("r"), ins[1].access_ptr("r"), ins[2].access_ptr("r"), zeros, y, *sizes]
    return parallel_extern("graphopt_dense_nbits", m, k, n, weights, arguments, tasks)
