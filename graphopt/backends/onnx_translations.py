"""ONNX translations of graphopt's own ops (graphopt.ir.quantized), for torch.onnx's
custom_translation_table.

    graphopt.matmul_nbits(x, packed, scales, zero_points)  ->  com.microsoft.MatMulNBits
    graphopt.embedding_nbits(ids, packed, ...)             ->  Gather + unpack + dequantize
                                                              (standard ONNX ops only)
The packed tensors are the initializers as they are: MatMulNBits reads our layout directly,
and a tied embedding shares them with the LM head instead of keeping an fp32 copy.
"""
from __future__ import annotations

from onnx.defs import OpSchema
from onnxscript import opset18 as op
from onnxscript.values import Op, Opset

from ..ir.quantized import EMBEDDING_NBITS, MATMUL_NBITS

MICROSOFT = Opset("com.microsoft", 1)

# onnx does not know ONNX Runtime's contrib ops; onnxscript needs a schema to build the node.
_param, _attr = OpSchema.FormalParameter, OpSchema.Attribute
_MATMUL_NBITS_SCHEMA = OpSchema(
    "MatMulNBits", "com.microsoft", 1,
    inputs=[_param("A", "T1"), _param("B", "T2"), _param("scales", "T1"), _param("zero_points", "T2")],
    outputs=[_param("Y", "T1")],
    type_constraints=[("T1", ["tensor(float)"], ""), ("T2", ["tensor(uint8)"], "")],
    attributes=[_attr(name, OpSchema.AttrType.INT, "") for name in ("K", "N", "bits", "block_size", "accuracy_level")],
)
_MatMulNBits = Op(MICROSOFT, "MatMulNBits", _MATMUL_NBITS_SCHEMA)


def matmul_nbits(x, packed, scales, zero_points, bits: int, block_size: int, k: int, accuracy_level: int):
    return _MatMulNBits(x, packed, scales, zero_points, K=k, N=packed.shape[0], bits=bits,
                        block_size=block_size, accuracy_level=accuracy_level)


def _unpack_nibbles(packed):
    low = op.BitwiseAnd(packed, op.CastLike(op.Constant(value_int=15), packed))
    high = op.BitShift(packed, op.CastLike(op.Constant(value_int=4), packed), direction="RIGHT")
    both = op.Concat(op.Unsqueeze(low, [-1]), op.Unsqueeze(high, [-1]), axis=-1)
    shape = op.Concat(op.Slice(op.Shape(packed), [0], [-1]), op.Constant(value_ints=[-1]), axis=0)
    return op.Reshape(both, shape)


def embedding_nbits(indices, packed, scales, zero_points, bits: int, block_size: int, k: int):
    n, n_blocks = packed.shape[0], packed.shape[1]
    rows = op.Gather(packed, indices, axis=0)                              # [*ids, nb, blob]
    codes = _unpack_nibbles(rows) if bits == 4 else rows                   # [*ids, nb, bs]
    table_zp = op.Reshape(zero_points, [n, -1])
    zp = op.Gather(table_zp, indices, axis=0)
    if bits == 4:
        zp = op.Slice(_unpack_nibbles(zp), [0], [n_blocks], [-1])
    scale = op.Gather(op.Reshape(scales, [n, n_blocks]), indices, axis=0)  # [*ids, nb]
    values = op.Mul(op.Sub(op.Cast(codes, to=1), op.Unsqueeze(op.Cast(zp, to=1), [-1])), op.Unsqueeze(scale, [-1]))
    flat_shape = op.Concat(op.Shape(indices), op.Constant(value_ints=[n_blocks * block_size]), axis=0)
    return op.Slice(op.Reshape(values, flat_shape), [0], [k], [-1])


TRANSLATIONS = {MATMUL_NBITS: matmul_nbits, EMBEDDING_NBITS: embedding_nbits}
