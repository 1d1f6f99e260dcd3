"""Seeded mutations of a valid ONNX model, and a worker that compiles them one by one.

`mutations(n)` yields (description, bytes). `python -m tests.frontend.onnx_mutations` reads
mutation indices on stdin and prints, per index, "start I" before and "done I STATUS DETAIL"
after compiling it, so a parent process can tell a crash or a hang from a result.
STATUS: error (a graphopt error), ok (compiled; outputs equal onnxruntime's), accepted
(compiled, onnxruntime rejects the model), wrong (outputs differ), foreign (another exception).
"""
from __future__ import annotations

import random
import sys

import numpy as np

INPUT_SHAPE = (2, 4)


def base_model():
    """x[2,4] -> MatMul W -> Add b -> Relu -> Reshape [4,2] -> Softmax -> Transpose -> Concat."""
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b"),
             numpy_helper.from_array(np.array([4, 2], np.int64), "shape")]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="matmul"),
             helper.make_node("Add", ["h", "b"], ["hb"], name="add"),
             helper.make_node("Relu", ["hb"], ["r"], name="relu"),
             helper.make_node("Reshape", ["r", "shape"], ["rs"], name="reshape"),
             helper.make_node("Softmax", ["rs"], ["sm"], name="softmax", axis=1),
             helper.make_node("Transpose", ["sm"], ["t"], name="transpose", perm=[1, 0]),
             helper.make_node("Concat", ["t", "t"], ["y"], name="concat", axis=0)]
    graph = helper.make_graph(nodes, "mutant", [helper.make_tensor_value_info("x", TensorProto.FLOAT, INPUT_SHAPE)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, (4, 4))], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _field_mutation(model, rng: random.Random) -> str:
    from onnx import AttributeProto, TensorProto, helper
    graph = graph_nodes = model.graph
    graph_nodes = graph.node
    node = graph_nodes[rng.randrange(len(graph_nodes))]
    kind = rng.choice(["dim", "dangling", "cycle", "attr_type", "huge_shape", "drop_init", "op_type", "elem_type",
                       "opset", "dup_output", "init_dims", "attr_value", "swap_nodes", "empty_name", "neg_dim"])
    if kind == "dim":
        dim = graph.input[0].type.tensor_type.shape.dim[rng.randrange(2)]
        dim.dim_value = rng.choice([0, 1, 3, 7, 1 << 40])
    elif kind == "neg_dim":
        init = next(i for i in graph.initializer if i.name == "shape")
        init.CopyFrom(helper.make_tensor("shape", TensorProto.INT64, [2], [rng.choice([-1, -2, 0, 3]), 2]))
    elif kind == "dangling":
        node.input[rng.randrange(len(node.input))] = "nowhere"
    elif kind == "cycle":
        later = graph_nodes[rng.randrange(len(graph_nodes))]
        node.input[0] = later.output[0]
    elif kind == "attr_type":
        for n in graph_nodes:
            for a in n.attribute:
                a.type = rng.choice(
                    [AttributeProto.FLOAT, AttributeProto.STRING, AttributeProto.INTS, AttributeProto.TENSOR]
                )
    elif kind == "attr_value":
        for n in graph_nodes:
            for a in n.attribute:
                if a.type == AttributeProto.INT:
                    a.i = rng.choice([-100, 5, 1 << 62])
                elif a.type == AttributeProto.INTS:
                    del a.ints[:]
                    a.ints.extend(rng.choice([[0, 0], [2, 1], [5, -7], []]))
    elif kind == "huge_shape":
        init = next(i for i in graph.initializer if i.name == "shape")
        init.CopyFrom(helper.make_tensor("shape", TensorProto.INT64, [2], [1 << 31, 1 << 31]))
    elif kind == "drop_init":
        del graph.initializer[rng.randrange(len(graph.initializer))]
    elif kind == "op_type":
        node.op_type = rng.choice(["Relu", "Foo", "", "Softmax", "Concat"])
    elif kind == "elem_type":
        target = rng.choice([graph.input[0].type.tensor_type, graph.output[0].type.tensor_type])
        target.elem_type = rng.choice([0, 7, 11, 16, 999])
    elif kind == "opset":
        model.opset_import[0].version = rng.choice([0, 1, 6, 10, 1000])
    elif kind == "dup_output":
        node.output[0] = graph_nodes[rng.randrange(len(graph_nodes))].output[0]
    elif kind == "init_dims":
        init = graph.initializer[rng.randrange(len(graph.initializer))]
        init.dims[0] = rng.choice([0, 1, 3, 1 << 33])
    elif kind == "swap_nodes":
        i, j = rng.randrange(len(graph_nodes)), rng.randrange(len(graph_nodes))
        a, b = graph_nodes[i], graph_nodes[j]
        saved = type(a)()
        saved.CopyFrom(a)
        a.CopyFrom(b)
        b.CopyFrom(saved)
    elif kind == "empty_name":
        node.output[0] = ""
    return f"{kind} at node {node.name}"


def mutations(count: int):
    """(description, serialized model) for seeds 0..count-1: half byte-level, half field-level."""
    data = base_model().SerializeToString()
    for seed in range(count):
        rng = random.Random(seed)
        if seed % 2:
            model = base_model()
            yield f"#{seed} field: {_field_mutation(model, rng)}", model.SerializeToString()
            continue
        raw = bytearray(data)
        kind = rng.choice(["flip", "truncate", "insert", "zero"])
        if kind == "flip":
            for _ in range(rng.randint(1, 8)):
                raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
        elif kind == "truncate":
            raw = raw[: rng.randrange(len(raw))]
        elif kind == "insert":
            at = rng.randrange(len(raw))
            raw[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        else:
            at = rng.randrange(len(raw))
            raw[at: at + rng.randint(1, 32)] = bytes(rng.randint(1, 32))
        yield f"#{seed} bytes: {kind}", bytes(raw)


def _run_one(index: int, data: bytes, tmpdir: str) -> tuple[str, str]:
    import os

    import onnxruntime as ort
    import torch

    import graphopt
    from graphopt.errors import GraphoptError
    path = os.path.join(tmpdir, f"m{index}.onnx")
    with open(path, "wb") as f:
        f.write(data)
    x = np.random.default_rng(index).standard_normal(INPUT_SHAPE).astype(np.float32)
    try:
        compiled = graphopt.compile(path, (torch.from_numpy(x),), passes="none", backend="torch", progress=False)
        got = compiled(torch.from_numpy(x))
    except GraphoptError as exc:
        message = str(exc)
        return ("error", message) if message and "\n" not in message else ("foreign", f"multi-line: {message[:200]!r}")
    except Exception as exc:  # noqa: BLE001 - what this test hunts for
        return "foreign", f"{type(exc).__name__}: {str(exc)[:200]}"
    got = got if isinstance(got, tuple) else (got,)
    try:
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        expected = session.run(None, {session.get_inputs()[0].name: x})
    except Exception as exc:  # noqa: BLE001
        return "accepted", f"onnxruntime: {str(exc).splitlines()[0][:200]}"
    same = len(got) == len(expected) and all(
        tuple(g.shape) == e.shape and np.allclose(g.detach().numpy(), e, rtol=1e-4, atol=1e-5)
        for g, e in zip(got, expected)
    )
    return ("ok", "") if same else ("wrong", "outputs differ from onnxruntime's")


def main() -> None:
    import tempfile
    import warnings
    warnings.simplefilter("ignore")
    count = int(sys.argv[1])
    models = dict(enumerate(data for _, data in mutations(count)))
    with tempfile.TemporaryDirectory() as tmpdir:
        for line in sys.stdin:
            index = int(line)
            print(f"start {index}", flush=True)
            status, detail = _run_one(index, models[index], tmpdir)
            print(f"done {index} {status} {detail.replace(chr(10), ' ')}", flush=True)


if __name__ == "__main__":
    main()
