"""ONNX Runtime backend.

    lower.py         IR -> torch.export -> torch.onnx (dynamo exporter) -> model.onnx (needs torch)
    translations.py  graphopt's own ops -> ONNX / com.microsoft ops (MatMulNBits, GroupQueryAttention)
    runner.py        the torch-free side: session options, OrtRunner, load_runner

`graphopt.backends.onnxruntime.X` reads X from lower.py on first use (OnnxRuntimeBackend,
export_onnx, CUSTOM_TRANSLATIONS, ...), so importing the runner never imports torch.
"""
from .._lazy import lower_attribute


def __getattr__(name: str):
    return lower_attribute(__name__, name)
