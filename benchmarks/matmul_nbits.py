"""ONNX Runtime's 4-bit matmul (MatMulNBits) against its fp32 MatMul, one layer at a time, on
SmolLM2's weight shapes at 1 row (a decode step) and 128 rows (a prefill): what bounds the
prefill of graphopt's int4 artifact on the onnxruntime backend.

Rows: fp32 MatMul; MatMulNBits at the int4 preset's block size (32) with fp32 compute
(accuracy_level 0: blocks dequantized, then an fp32 product) and int8 compute (level 4: the
activations quantized per block, integer dot products), with and without zero points; and at
block 128 (fewer scales per product), for comparison. Each call runs `--layers` matmuls of
one shape with their own random weights (as the model does: one layer's weights repeated
would stay in cache; the kernels' speed does not depend on the values); one session per row
with `--threads` threads, timed round-robin in blocks of `--calls` consecutive calls (after
one untimed call, which pays for waking the session's threads).

    python benchmarks/matmul_nbits.py [--threads 2] [--repeats 15] [--calls 3] [--layers 30] [--json out.json]
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import interleaved_medians, print_table, write_json  # noqa: E402

# SmolLM2-135M: (name, k, n) of its weight matmuls
SHAPES = (("q/o proj", 576, 576), ("k/v proj", 576, 192), ("gate/up proj", 576, 1536), ("down proj", 1536, 576))
# (label, block size, zero points, accuracy level)
VARIANTS = (("int4 b32, fp32 compute", 32, False, 0), ("int4 b32, int8 compute", 32, False, 4),
            ("int4 b32 + zero points, int8 compute", 32, True, 4), ("int4 b128, int8 compute", 128, False, 4))


def session(nodes, initializers, rows: int, k: int, n: int, threads: int):
    import onnxruntime as ort
    from onnx import TensorProto, helper

    outputs = [helper.make_tensor_value_info(node.output[0], TensorProto.FLOAT, [rows, n]) for node in nodes]
    graph = helper.make_graph(nodes, "layers", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, k])],
                              outputs, initializers)
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def candidates(rows: int, k: int, n: int, layers: int, threads: int, rng) -> dict:
    """name -> a call running `layers` matmuls of one shape, each with its own weights (so that
    they come from memory, as in the model, not from a cache a repeated call keeps warm)."""
    from onnx import helper, numpy_helper

    x = rng.standard_normal((rows, k), dtype=np.float32)
    weights = [numpy_helper.from_array(rng.standard_normal((k, n), dtype=np.float32), f"W{i}") for i in range(layers)]
    nodes = [helper.make_node("MatMul", ["x", f"W{i}"], [f"y{i}"]) for i in range(layers)]
    made = {"fp32 MatMul": session(nodes, weights, rows, k, n, threads)}
    for label, block, zero_points, level in VARIANTS:
        blocks = -(-k // block)
        initializers, nodes = [], []
        for i in range(layers):
            inputs = [numpy_helper.from_array(rng.integers(0, 256, (n, blocks, block // 2), dtype=np.uint8), f"B{i}"),
                      numpy_helper.from_array(rng.random(n * blocks, dtype=np.float32) * 0.01, f"S{i}")]
            if zero_points:
                inputs.append(numpy_helper.from_array(
                    rng.integers(0, 256, n * ((blocks + 1) // 2), dtype=np.uint8), f"Z{i}"))
            initializers += inputs
            nodes.append(helper.make_node("MatMulNBits", ["x", *[t.name for t in inputs]], [f"y{i}"],
                                          domain="com.microsoft", K=k, N=n, bits=4, block_size=block,
                                          accuracy_level=level))
        made[label] = session(nodes, initializers, rows, k, n, threads)
    return {name: (lambda s=s: s.run(None, {"x": x})) for name, s in made.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--calls", type=int, default=3, help="consecutive calls timed as one block")
    ap.add_argument("--layers", type=int, default=30, help="matmuls of each shape per call (SmolLM2 has 30 layers)")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args()
    try:
        import onnxruntime
    except ImportError:
        print("onnxruntime: not installed")
        write_json([{"name": "onnxruntime", "note": "not installed"}], args.json)
        return
    rng = np.random.default_rng(0)
    rows = []
    for m in (1, 128):
        for shape, k, n in SHAPES:
            medians = interleaved_medians(candidates(m, k, n, args.layers, args.threads, rng), args.repeats,
                                          calls_per_round=args.calls)
            fp32 = medians["fp32 MatMul"]
            rows += [{"name": f"{name}, {shape} {k}x{n}, {m} row(s)", "rows": m, "k": k, "n": n,
                      "us_per_layer": seconds * 1e6 / args.layers, "time_vs_fp32": seconds / fp32}
                     for name, seconds in medians.items()]
    print(f"\nONNX Runtime {onnxruntime.__version__}, {args.threads} threads, "
          f"{args.layers} layers of each shape per call, median of {args.repeats} interleaved rounds of "
          f"{args.calls} calls")
    print_table(rows, ["name", "us_per_layer", "time_vs_fp32"])
    write_json(rows, args.json)


if __name__ == "__main__":
    main()
