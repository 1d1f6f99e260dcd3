"""The ONNX importer's op registry: OPS (op -> torch translation), the attributes and outputs each
translation implements, and the helpers translations share (trace-time constants, attribute reading).

A translation is `fn(static, attributes, *inputs)`: `static` is a StaticValues for the node, `attributes`
its attributes as Python values. Category modules (elementwise, tensors, nn, attention) add one
`register` line per op.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from ...errors import UnsupportedOpError


def node_attributes(node) -> dict[str, Any]:
    from onnx import helper, numpy_helper
    out = {}
    for a in node.attribute:
        value = helper.get_attribute_value(a)
        if a.type == a.TENSOR:
            value = numpy_helper.to_array(value)
        elif isinstance(value, bytes):
            value = value.decode()
        out[a.name] = value
    return out


def torch_dtype(onnx_type: int) -> torch.dtype:
    from onnx import helper
    return torch.from_numpy(np.zeros(0, helper.tensor_dtype_to_np_dtype(onnx_type))).dtype


ONNX_TYPE_OF = {torch.float32: 1, torch.float16: 10, torch.float64: 11, torch.bfloat16: 16}


class StaticValues:
    """Helpers that demand trace-time constants for shape-like inputs."""

    def __init__(self, node_desc: str, num_outputs: int, opset: int = 0):
        self.node_desc = node_desc
        self.num_outputs = num_outputs
        self.opset = opset
        self.static_arrays: dict[int, np.ndarray] = {}

    def _known(self, value, what: str) -> np.ndarray:
        value = self.static_arrays.get(id(value), value)
        if isinstance(value, torch.Tensor):
            raise UnsupportedOpError(f"{self.node_desc}: input '{what}' must be a constant known at import "
                                     "time (data-dependent shapes are not supported)")
        return np.asarray(value).reshape(-1)

    def ints(self, value, what: str) -> list[int]:
        return [] if value is None else [int(v) for v in self._known(value, what)]

    def floats(self, value, what: str) -> list[float]:
        return [] if value is None else [float(v) for v in self._known(value, what)]


OPS: dict[str, Callable] = {}


# The attributes each translation reads, over every opset it accepts. Any other attribute on
# a node raises UnsupportedOpError: nothing the importer does not implement is ignored.
ATTRIBUTES: dict[str, tuple[str, ...]] = {}


# Ops with more outputs than one: the most each translation produces (None: any number).
OUTPUTS: dict[str, int | None] = {}


# Element types the importer computes in (torch lacks arithmetic on uint16..uint64; numpy
# has no bfloat16 or float8 for the artifacts' inputs).
ELEMENT_TYPES = ("FLOAT", "DOUBLE", "FLOAT16", "INT8", "INT16", "INT32", "INT64", "UINT8", "BOOL")


# Float inputs that are numbers at import time, not tensors: (op, input positions).
READ_AT_IMPORT = {"Resize": (1, 2, 3), "Pad": (2,)}


def register(op: str, translation: Callable, attributes: tuple[str, ...] = (), outputs: int | None = 1) -> None:
    """Add `op`'s translation; `attributes` are the ones it reads, `outputs` the most it produces
    (None: any number). A second registration of one op is an error."""
    if op in OPS:
        raise ValueError(f"ONNX op {op} is registered twice")
    OPS[op] = translation
    if attributes:
        ATTRIBUTES[op] = tuple(attributes)
    if outputs != 1:
        OUTPUTS[op] = outputs
