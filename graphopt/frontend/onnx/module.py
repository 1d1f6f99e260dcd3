"""import_onnx: an .onnx file -> OnnxModule, a torch module that runs the graph node by node with the
registered translations and that torch.export captures into graphopt's IR.
"""
from __future__ import annotations

import os
import re
from typing import Any

import numpy as np
import torch

from ...errors import CaptureError, UnsupportedOpError
from .checks import check_array_type, check_declared, check_element_types, check_node, check_outputs, check_schema
from .registry import OPS, READ_AT_IMPORT, StaticValues, node_attributes, torch_dtype


class OnnxModule(torch.nn.Module):
    """Runs an ONNX graph with torch ops; see the package docstring."""

    def __init__(self, model, source: str = "model.onnx"):
        super().__init__()
        from onnx import numpy_helper
        graph = model.graph
        self.source = source
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
        check_element_types(graph, source)
        self.static: dict[str, np.ndarray] = {}
        self.buffer_of: dict[str, str] = {}
        read_at_import = {n.input[k] for n in graph.node for k in READ_AT_IMPORT.get(n.op_type, ())
                          if k < len(n.input) and n.input[k]}
        for init in graph.initializer:
            try:
                array = numpy_helper.to_array(init)
            except Exception as exc:
                raise CaptureError(f"{source}: initializer '{init.name}' does not hold the data its dims "
                                   f"{list(init.dims)} say: {_first_line(exc)}") from exc
            if (array.dtype.kind in "iub" or init.name in read_at_import) and array.size <= 64:
                self.static[init.name] = array
            else:
                name = re.sub(r"\W", "_", init.name)
                while hasattr(self, name):
                    name += "_"
                self.register_buffer(name, torch.from_numpy(array.copy()))
                self.buffer_of[init.name] = name
        init_names = {i.name for i in graph.initializer}
        self.input_names = [i.name for i in graph.input if i.name not in init_names]
        self.output_names = [o.name for o in graph.output]
        self.nodes = []
        for index, node in enumerate(graph.node):
            desc = f"ONNX node '{node.name or f'#{index}'}' (op {node.op_type}, domain '{node.domain}')"
            if node.op_type == "Constant":
                self.static[node.output[0]] = self._constant(node)
                check_array_type(self.static[node.output[0]], f"{desc} in {source}: value")
                continue
            if node.domain not in ("", "ai.onnx", "com.microsoft") or node.op_type not in OPS:
                raise UnsupportedOpError(f"{desc} in {source} is not supported by graphopt's ONNX importer")
            check_schema(node, self.opset, f"{desc} in {source}")
            attrs = node_attributes(node)
            check_node(node, attrs, f"{desc} in {source}")
            self.nodes.append((desc, node.op_type, list(node.input), list(node.output), attrs))
        self._as_linear_layers()

    def _buffer(self, name: str, rank: int) -> torch.Tensor | None:
        """The floating-point initializer `name` if it has `rank` dims, else None."""
        value = getattr(self, self.buffer_of[name]) if name in self.buffer_of else None
        return value if value is not None and value.is_floating_point() and value.dim() == rank else None

    def _as_linear_layers(self) -> None:
        """MatMul / Gemm by a constant matrix (and an Add of a constant bias right after a
        MatMul) become one linear layer, captured as an nn.Linear would be, so the passes that
        find linear layers (fusion, quantization, head and channel pruning) see them."""
        readers: dict[str, list[int]] = {}
        transposed: dict[str, str] = {}      # Transpose outputs of a constant matrix (a tied LM head) -> it
        for i, (_, op, inputs, outputs, attrs) in enumerate(self.nodes):
            for name in inputs:
                readers.setdefault(name, []).append(i)
            if op == "Transpose" and self._buffer(inputs[0], 2) is not None and attrs.get("perm", [1, 0]) == [1, 0]:
                transposed[outputs[0]] = inputs[0]
        merged = set()
        for i, (desc, op, inputs, outputs, attrs) in enumerate(self.nodes):
            if op == "MatMul" and len(inputs) == 2 and inputs[1] in transposed:
                self.nodes[i] = (desc, "_linear", [inputs[0], transposed[inputs[1]]], outputs, {})   # x @ W.T
                continue
            if op not in ("MatMul", "Gemm") or len(inputs) < 2 or (weight := self._buffer(inputs[1], 2)) is None:
                continue
            bias = None
            if op == "Gemm":
                if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
                    continue
                weight = weight if attrs.get("transB", 0) else weight.t()
                if len(inputs) > 2 and inputs[2]:
                    bias = inputs[2]
                    if (b := self._buffer(bias, 1)) is None or b.numel() != weight.shape[0]:
                        continue
            else:
                weight = weight.t()
                users = readers.get(outputs[0], [])
                if len(users) == 1 and outputs[0] not in self.output_names and self.nodes[users[0]][1] == "Add":
                    add = self.nodes[users[0]]
                    other = [name for name in add[2] if name != outputs[0]]
                    if len(other) == 1 and (b := self._buffer(other[0], 1)) is not None and \
                            b.numel() == weight.shape[0]:
                        bias, outputs = other[0], add[3]
                        merged.add(users[0])
            name = f"{self.buffer_of[inputs[1]]}_linear"
            while hasattr(self, name):
                name += "_"
            self.register_buffer(name, weight.contiguous())
            self.buffer_of[name] = name
            self.nodes[i] = (desc, "_linear", [inputs[0], name] + ([bias] if bias else []), outputs, {})
        self.nodes = [node for i, node in enumerate(self.nodes) if i not in merged]
        used = {name for _, _, inputs, _, _ in self.nodes for name in inputs} | set(self.output_names)
        for onnx_name, attr in list(self.buffer_of.items()):
            if onnx_name not in used:
                delattr(self, attr)
                del self.buffer_of[onnx_name]

    @staticmethod
    def _constant(node) -> np.ndarray:
        attrs = node_attributes(node)
        for key in ("value", "value_float", "value_floats", "value_int", "value_ints"):
            if key in attrs:
                value = attrs[key]
                return np.asarray(value, dtype=np.float32 if "float" in key else (np.int64 if "int" in key else None))
        raise UnsupportedOpError(f"Constant node '{node.name}' uses an unsupported attribute")

    def forward(self, *args: torch.Tensor):
        """Run the graph. The first (eager) call also caches every value that does not depend
        on the inputs' values in `self.static`; traced calls then skip those nodes."""
        env: dict[str, Any] = dict(self.static)
        env.update({k: getattr(self, v) for k, v in self.buffer_of.items()})
        env.update(zip(self.input_names, args))
        for desc, op_type, inputs, outputs, attrs in self.nodes:
            if all(not name or name in self.static for name in outputs):
                continue
            values = [env[name] if name else None for name in inputs]
            helper = StaticValues(desc, len(outputs), self.opset)
            all_static = all(v is None or isinstance(v, np.ndarray) for v in values)
            tensors = []
            for v in values:
                t = torch.from_numpy(np.array(v)) if isinstance(v, np.ndarray) else v
                if isinstance(v, np.ndarray):
                    helper.static_arrays[id(t)] = v
                tensors.append(t)
            try:
                result = OPS[op_type](helper, attrs, *tensors)
            except UnsupportedOpError:
                raise
            except Exception as exc:
                raise CaptureError(f"{desc} failed: {type(exc).__name__}: {str(exc).splitlines()[0]}") from exc
            results = result if isinstance(result, tuple) else (result,)
            for name, value in zip(outputs, results):
                if not name:
                    continue
                if all_static or op_type == "Shape":
                    value = value.detach().numpy().copy()
                    self.static[name] = value
                env[name] = value
        return tuple(torch.from_numpy(np.array(env[n])) if isinstance(env[n], np.ndarray) else env[n]
                     for n in self.output_names)


def _load(path: str, external_data: bool = True):
    import onnx
    if not os.path.isfile(path):
        raise CaptureError(f"ONNX file {path} not found")
    try:
        model = onnx.load(path, load_external_data=external_data)
    except Exception as exc:
        raise CaptureError(f"{path} is not a readable ONNX model: {_first_line(exc)}") from exc
    if not external_data:                   # only the signature is read; the full import checks the model
        return model
    try:
        onnx.checker.check_model(path)
    except Exception as exc:
        # The checker wants a shape on every graph input and output; the spec (and ONNX
        # Runtime) take a tensor type without one, so that alone is no reason to refuse.
        if "Field 'shape' of 'type' is required" not in str(exc):
            raise CaptureError(f"{path} is not a valid ONNX model: {_first_line(exc)}") from exc
    return model


def _first_line(exc: Exception) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def _check_example_inputs(graph, names: list[str], example_inputs, path: str) -> None:
    """Each example input must have its graph input's declared element type and fixed dims."""
    declared = {v.name: v.type.tensor_type for v in graph.input}
    for name, value in zip(names, example_inputs):
        if not isinstance(value, torch.Tensor):
            raise CaptureError(f"{path}: example input '{name}' is a {type(value).__name__}, not a torch tensor")
        check_declared(declared[name], value, f"{path}: input '{name}'", "the example input is",
                        "the example input has")


def example_inputs_for(path: str | os.PathLike, dims: dict[str, int] | None = None,
                       seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Example inputs for an ONNX file's graph inputs: fixed dims from the file, named (or
    unnamed) dims from `dims` (name -> size). Float inputs are N(0, 1); integer inputs are
    0..99 (token ids every vocabulary has), or all ones when named like a mask."""
    path = os.fspath(path)
    graph = _load(path, external_data=False).graph
    init_names = {i.name for i in graph.initializer}
    generator = torch.Generator().manual_seed(seed)
    dims = dims or {}
    inputs = []
    for value in graph.input:
        if value.name in init_names:
            continue
        tensor_type = value.type.tensor_type
        shape = []
        for k, d in enumerate(tensor_type.shape.dim):
            if d.HasField("dim_value"):
                shape.append(d.dim_value)
            elif d.dim_param in dims:
                shape.append(int(dims[d.dim_param]))
            else:
                raise CaptureError(f"{path}: input '{value.name}' dim {k} is "
                                   f"{repr(d.dim_param) if d.dim_param else 'unnamed'}: give its size "
                                   f"(--dim {d.dim_param or 'NAME'}=SIZE)")
        dtype = torch_dtype(tensor_type.elem_type)
        if dtype.is_floating_point:
            inputs.append(torch.randn(shape, generator=generator).to(dtype))
        elif "mask" in value.name.lower():
            inputs.append(torch.ones(shape, dtype=dtype))
        else:
            inputs.append(torch.randint(0, 100, shape, generator=generator).to(dtype))
    return tuple(inputs)


def import_onnx(path: str | os.PathLike, example_inputs):
    """Load an .onnx file as an OnnxModule; returns (module, example inputs as a tuple)."""
    path = os.fspath(path)
    model = _load(path)
    module = OnnxModule(model, os.path.basename(path))
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if isinstance(example_inputs, dict):
        example_inputs = tuple(example_inputs[n] for n in module.input_names)
    example_inputs = tuple(example_inputs)
    if len(example_inputs) != len(module.input_names):
        raise CaptureError(f"{path} takes {len(module.input_names)} inputs ({', '.join(module.input_names)}), "
                           f"got {len(example_inputs)} example inputs")
    _check_example_inputs(model.graph, module.input_names, example_inputs, path)
    with torch.no_grad():
        outputs = module(*example_inputs)  # eager pass: caches the input-independent (shape) values
    check_outputs(model.graph, outputs, path)
    return module, example_inputs
