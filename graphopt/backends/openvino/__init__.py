"""OpenVINO backend.

    lower.py    IR -> the ONNX Runtime backend's ONNX export -> OpenVINO's converter ->
                model.xml + model.bin (needs torch)
    runner.py   the torch-free side: compile_model with a precision hint, OpenVinoRunner, load_runner

graphopt's quantized matmuls (com.microsoft MatMulNBits in the export) become OpenVINO's
compressed-weight pattern (u4/u8 constants, Convert, Subtract zero point, Multiply scale,
MatMul), which its CPU plugin runs as weight-compressed matmuls.
`graphopt.backends.openvino.X` reads X from lower.py on first use (as for onnxruntime).
"""
from .._lazy import lower_attribute


def __getattr__(name: str):
    return lower_attribute(__name__, name)
