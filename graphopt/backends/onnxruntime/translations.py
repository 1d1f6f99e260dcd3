"""ONNX translations of graphopt's own ops (graphopt.ir.quantized), for torch.onnx's
custom_translation_table.

    graphopt.matmul_nbits(x, packed, scales, zero_points)  ->  com.microsoft.MatMulNBits
    graphopt.embedding_nbits(ids, packed, ...)             ->  Gather + unpack + dequantize
                                                              (standard ONNX ops only)
    graphopt.kv_attention(q, k, v, past_k, past_v, ...)    ->  com.microsoft.GroupQueryAttention
                                                              (in place when past and present
                                                              are bound to one buffer)
    graphopt.moe_experts(x, index, weights, gate_up, down)  ->  per expert: its tokens (NonZero,
                                                              Gather), two MatMuls, ScatterND-add
                                                              (standard ONNX ops only)
    graphopt.moe_experts_nbits(...)                         ->  the same with MatMulNBits per expert
The packed tensors are the initializers as they are: MatMulNBits reads our layout directly,
and a tied embedding shares them with the LM head instead of keeping an fp32 copy.
"""
from __future__ import annotations

from onnx.defs import OpSchema
from onnxscript import opset18 as op
from onnxscript.values import Op, Opset

from ...ir.kv_attention import KV_ATTENTION
from ...ir.moe import ACTIVATIONS, MOE_EXPERTS, MOE_EXPERTS_NBITS
from ...ir.quantized import EMBEDDING_NBITS, MATMUL_NBITS

MICROSOFT = Opset("com.microsoft", 1)

# onnx does not know ONNX Runtime's contrib ops; onnxscript needs a schema to build the node.
_param, _attr = OpSchema.FormalParameter, OpSchema.Attribute
_MATMUL_NBITS_SCHEMA = OpSchema(
    "MatMulNBits", "com.microsoft", 1,
    inputs=[_param("A", "T1"), _param("B", "T2"), _param("scales", "T1"),
            _param("zero_points", "T2", param_option=OpSchema.FormalParameterOption.Optional)],
    outputs=[_param("Y", "T1")],
    type_constraints=[("T1", ["tensor(float)"], ""), ("T2", ["tensor(uint8)"], "")],
    attributes=[_attr(name, OpSchema.AttrType.INT, "") for name in ("K", "N", "bits", "block_size", "accuracy_level")],
)
_MatMulNBits = Op(MICROSOFT, "MatMulNBits", _MATMUL_NBITS_SCHEMA)
_GQA_SCHEMA = OpSchema(
    "GroupQueryAttention", "com.microsoft", 1,
    inputs=[_param(name, "T") for name in ("query", "key", "value", "past_key", "past_value")]
    + [_param("seqlens_k", "M"), _param("total_sequence_length", "M")]
    + [_param(name, "T", param_option=OpSchema.FormalParameterOption.Optional) for name in ("cos_cache", "sin_cache")],
    outputs=[_param("output", "T"), _param("present_key", "T"), _param("present_value", "T")],
    type_constraints=[("T", ["tensor(float)", "tensor(float16)"], ""), ("M", ["tensor(int32)"], "")],
    attributes=[_attr("num_heads", OpSchema.AttrType.INT, ""), _attr("kv_num_heads", OpSchema.AttrType.INT, ""),
                _attr("scale", OpSchema.AttrType.FLOAT, ""), _attr("do_rotary", OpSchema.AttrType.INT, "")],
)
_GroupQueryAttention = Op(MICROSOFT, "GroupQueryAttention", _GQA_SCHEMA)


def matmul_nbits(x, packed, scales, zero_points, bits: int, block_size: int, k: int, accuracy_level: int):
    if zero_points.shape[0] == 0:        # every zero point 2**(bits-1): MatMulNBits's default
        return _MatMulNBits(x, packed, scales, K=k, N=packed.shape[0], bits=bits, block_size=block_size,
                            accuracy_level=accuracy_level)
    return _MatMulNBits(x, packed, scales, zero_points, K=k, N=packed.shape[0], bits=bits,
                        block_size=block_size, accuracy_level=accuracy_level)


def kv_attention(query, key, value, past_key, past_value, seqlens_k, total_length, num_heads: int,
                 kv_num_heads: int, scale: float, cos_cache=None, sin_cache=None):
    narrower, model_type = past_key.dtype != query.dtype, query   # a float16 cache: attention in float16
    if narrower:
        query, key, value = (op.CastLike(t, past_key) for t in (query, key, value))
        if cos_cache is not None:
            cos_cache, sin_cache = op.CastLike(cos_cache, past_key), op.CastLike(sin_cache, past_key)
    rotary = {} if cos_cache is None else {"do_rotary": 1}
    tables = () if cos_cache is None else (cos_cache, sin_cache)
    out, present_key, present_value = _GroupQueryAttention(
        query, key, value, past_key, past_value, seqlens_k, total_length, *tables, num_heads=num_heads,
        kv_num_heads=kv_num_heads, scale=scale, _num_outputs=3, **rotary)
    if narrower:
        out = op.CastLike(out, model_type)
    return out, present_key, present_value


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
    if zero_points.shape[0] == 0:
        zp = op.Constant(value_int=1 << (bits - 1))
    else:
        zp = op.Gather(op.Reshape(zero_points, [n, -1]), indices, axis=0)
        if bits == 4:
            zp = op.Slice(_unpack_nibbles(zp), [0], [n_blocks], [-1])
        zp = op.Unsqueeze(op.Cast(zp, to=1), [-1])
    scale = op.Cast(op.Gather(op.Reshape(scales, [n, n_blocks]), indices, axis=0), to=1)  # [*ids, nb]
    values = op.Mul(op.Sub(op.Cast(codes, to=1), op.CastLike(zp, scale)), op.Unsqueeze(scale, [-1]))
    flat_shape = op.Concat(op.Shape(indices), op.Constant(value_ints=[n_blocks * block_size]), axis=0)
    return op.Slice(op.Reshape(values, flat_shape), [0], [k], [-1])


def _activation(x, activation: str):
    if activation == "silu":
        return op.Mul(x, op.Sigmoid(x))
    if activation == "relu":
        return op.Relu(x)
    half, one = op.CastLike(op.Constant(value_float=0.5), x), op.CastLike(op.Constant(value_float=1.0), x)
    if activation == "gelu":
        erf = op.Erf(op.Mul(x, op.CastLike(op.Constant(value_float=2 ** -0.5), x)))
        return op.Mul(op.Mul(half, x), op.Add(one, erf))
    if activation == "gelu_tanh":
        inner = op.Mul(op.CastLike(op.Constant(value_float=(2 / 3.141592653589793) ** 0.5), x),
                       op.Add(x, op.Mul(op.CastLike(op.Constant(value_float=0.044715), x), op.Mul(x, op.Mul(x, x)))))
        return op.Mul(op.Mul(half, x), op.Add(one, op.Tanh(inner)))
    raise ValueError(f"moe_experts: no ONNX form for activation '{activation}' (known: {', '.join(ACTIVATIONS)})")


def _sparse_experts(hidden, top_k_index, top_k_weights, experts: int, intermediate: int, activation: str, project):
    """Each expert on the tokens routed to it; project(expert, "gate_up" | "down", x) is x @ W.T."""
    out = op.CastLike(op.ConstantOfShape(op.Shape(hidden)), hidden)
    no_weight = op.CastLike(op.Constant(value_float=0.0), top_k_weights)
    for expert in range(experts):
        hit = op.Equal(top_k_index, op.Constant(value_int=expert))                          # [T, k]
        weight = op.ReduceSum(op.Where(hit, top_k_weights, no_weight), [1], keepdims=0)     # [T]
        routed = op.ReduceMax(op.Cast(hit, to=6), [1], keepdims=0)                           # int32 [T]
        tokens = op.Reshape(op.NonZero(routed), op.Constant(value_ints=[-1]))               # [n]
        projected = project(expert, "gate_up", op.Gather(hidden, tokens, axis=0))
        gate = op.Slice(projected, [0], [intermediate], [1])
        up = op.Slice(projected, [intermediate], [2 * intermediate], [1])
        y = project(expert, "down", op.Mul(_activation(gate, activation), up))
        y = op.Mul(y, op.Unsqueeze(op.CastLike(op.Gather(weight, tokens, axis=0), y), [1]))
        out = op.ScatterND(out, op.Unsqueeze(tokens, [1]), y, reduction="add")
    return out


def moe_experts(hidden, top_k_index, top_k_weights, gate_up, down, activation: str):
    weights = {"gate_up": gate_up, "down": down}

    def project(expert, which, x):
        return op.MatMul(x, op.Transpose(op.Gather(weights[which], op.Constant(value_int=expert), axis=0)))
    return _sparse_experts(hidden, top_k_index, top_k_weights, gate_up.shape[0], down.shape[2], activation, project)


def moe_experts_nbits(hidden, top_k_index, top_k_weights, gate_up, down, bits: int, gate_up_block_size: int,
                      down_block_size: int, activation: str, accuracy_level: int):
    parts = {"gate_up": gate_up, "down": down}
    intermediate = gate_up[0].shape[1] // 2
    sizes = {"gate_up": hidden.shape[-1], "down": intermediate}
    blocks = {"gate_up": gate_up_block_size, "down": down_block_size}

    def project(expert, which, x):
        packed, scales, zero_points, minimums = parts[which]
        block_size = blocks[which]
        index = op.Constant(value_int=expert)
        n, n_blocks = packed.shape[1], packed.shape[2]
        scale = op.Cast(op.Gather(scales, index, axis=0), to=1)
        zp = () if zero_points.shape[1] == 0 else (op.Gather(zero_points, index, axis=0),)
        y = _MatMulNBits(x, op.Gather(packed, index, axis=0), scale, *zp, K=sizes[which], N=n, bits=bits,
                         block_size=block_size, accuracy_level=accuracy_level)
        if minimums.shape[1] == 0:
            return y
        # The "offset" grid: + blocksum(x) @ (minimum + 2**(bits-1) * scale).T (see WeightQuantization).
        offsets = op.Transpose(op.Add(op.Cast(op.Gather(minimums, index, axis=0), to=1),
                                      op.Mul(op.Reshape(scale, op.Constant(value_ints=[n, n_blocks])),
                                             op.Constant(value_float=float(1 << (bits - 1))))))
        sums = op.ReduceSum(op.Reshape(x, op.Constant(value_ints=[-1, n_blocks, block_size])), [-1], keepdims=0)
        return op.Add(y, op.MatMul(sums, offsets))
    return _sparse_experts(hidden, top_k_index, top_k_weights, gate_up[0].shape[0], intermediate, activation,
                           project)


TRANSLATIONS = {MATMUL_NBITS: matmul_nbits, EMBEDDING_NBITS: embedding_nbits, KV_ATTENTION: kv_attention,
                MOE_EXPERTS: moe_experts, MOE_EXPERTS_NBITS: moe_experts_nbits}
