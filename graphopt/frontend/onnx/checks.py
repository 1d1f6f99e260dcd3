"""What the importer checks before and after running a graph: attributes, outputs and element types a
translation implements, the op's schema at the model's opset, declared types and dims.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ...errors import CaptureError, UnsupportedOpError
from .registry import ATTRIBUTES, ELEMENT_TYPES, OUTPUTS, torch_dtype


def check_node(node, attrs: dict[str, Any], desc: str) -> None:
    """Raise UnsupportedOpError for an attribute, an output or a target type the op's
    translation does not implement."""
    known = ATTRIBUTES.get(node.op_type, ())
    for name in attrs:
        if name not in known:
            raise UnsupportedOpError(f"{desc}: attribute '{name}' is not supported")
    most = OUTPUTS.get(node.op_type, 1)
    if most is not None and len(node.output) > most:
        raise UnsupportedOpError(f"{desc}: output #{most} ('{node.output[most]}') is not supported; "
                                 f"the importer computes {most} output{'s' if most > 1 else ''}")
    if node.op_type == "Cast":
        check_type(attrs["to"], f"{desc}: 'to'")
    if node.op_type == "ConstantOfShape" and "value" in attrs:
        check_array_type(attrs["value"], f"{desc}: value")


def check_schema(node, opset: int, desc: str) -> None:
    """The op must exist at the model's opset (ONNX Runtime refuses it otherwise)."""
    import onnx.defs
    if node.domain not in ("", "ai.onnx"):
        return
    newest = onnx.defs.onnx_opset_version()
    if not 1 <= opset <= newest:
        raise CaptureError(f"{desc}: the model imports opset {opset} of the default domain; ONNX defines 1..{newest}")
    try:
        onnx.defs.get_schema(node.op_type, opset, "")
    except onnx.defs.SchemaError:
        raise CaptureError(f"{desc}: {node.op_type} does not exist in opset {opset}") from None


def check_declared(tensor_type, value: torch.Tensor, what: str, is_phrase: str, has_phrase: str) -> None:
    """`value` must have the element type and fixed dims `tensor_type` declares."""
    want = torch_dtype(tensor_type.elem_type)
    if value.dtype != want:
        raise CaptureError(f"{what} is declared {str(want).replace('torch.', '')}, "
                           f"{is_phrase} {str(value.dtype).replace('torch.', '')}")
    if tensor_type.HasField("shape"):
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim]
        if len(dims) != value.dim() or any(d is not None and d != s for d, s in zip(dims, value.shape)):
            shown = ["?" if d is None else d for d in dims]
            raise CaptureError(f"{what} is declared with shape {shown}, {has_phrase} {list(value.shape)}")


def check_outputs(graph, outputs, path: str) -> None:
    """What the graph computed must have the element types and fixed dims it declares."""
    for value, out in zip(graph.output, outputs):
        check_declared(value.type.tensor_type, out, f"{path}: output '{value.name}'", "the graph computes",
                        "the graph computes")


def check_type(elem_type: int, what: str) -> None:
    from onnx import TensorProto
    if elem_type not in TensorProto.DataType.values():
        raise UnsupportedOpError(f"{what} has element type {elem_type}, which is not an ONNX type")
    name = TensorProto.DataType.Name(elem_type)
    if name not in ELEMENT_TYPES:
        raise UnsupportedOpError(f"{what} has element type {name}, which graphopt's ONNX importer does not "
                                 f"support (supported: {', '.join(ELEMENT_TYPES)})")


def check_array_type(array: np.ndarray, what: str) -> None:
    from onnx import helper
    try:
        elem_type = helper.np_dtype_to_tensor_dtype(np.asarray(array).dtype)
    except (KeyError, TypeError, ValueError):
        raise UnsupportedOpError(f"{what} has numpy dtype {np.asarray(array).dtype}, which graphopt's ONNX "
                                 "importer does not support") from None
    check_type(elem_type, what)


def check_element_types(graph, source: str) -> None:
    for kind, values in (("input", graph.input), ("output", graph.output), ("value", graph.value_info)):
        for value in values:
            if value.type.HasField("tensor_type"):
                check_type(value.type.tensor_type.elem_type, f"{source}: {kind} '{value.name}'")
            else:
                raise UnsupportedOpError(f"{source}: {kind} '{value.name}' is a {value.type.WhichOneof('value')}, "
                                         "not a tensor; inputs and outputs other than tensors are not supported")
    for init in graph.initializer:
        check_type(init.data_type, f"{source}: initializer '{init.name}'")
