"""ONNX import: an .onnx file -> a torch module that torch.export captures into the same IR.

Each ONNX node is run by a torch function. Values known at trace time (initializers of
integer type, Constant nodes, Shape of a static tensor, and anything computed only from
those) stay numpy arrays, so shape arithmetic folds away and Reshape/Slice/Expand get
static arguments. An op outside the table raises UnsupportedOpError naming node and op.
Static shapes only: the example inputs fix every dimension.

Modules: registry (OPS and what each translation implements), elementwise, tensors, nn and
attention (one `register` line per op, grouped by category), checks, module (OnnxModule,
import_onnx, example_inputs_for). A new op is one `register` line in its category's module.
"""
from . import attention, elementwise, nn, tensors  # noqa: F401  (each registers its ops)
from .module import OnnxModule, example_inputs_for, import_onnx
from .registry import ATTRIBUTES, ELEMENT_TYPES, OPS, OUTPUTS, register

__all__ = [
    "ATTRIBUTES", "ELEMENT_TYPES", "OPS", "OUTPUTS", "OnnxModule", "example_inputs_for", "import_onnx", "register",
]
