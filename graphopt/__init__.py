"""graphopt: capture a model into a graph, rewrite it with passes, lower it to a fast backend.

    cm = graphopt.compile(model, example_inputs, passes="default", backend="onnxruntime")
    cm.save("dist/model");  rt = graphopt.load("dist/model")

`graphopt.load` and the artifact runtime need only numpy and onnxruntime; everything else
is imported on first use so that a deployment without torch can still load artifacts.
"""
from __future__ import annotations

from ._moved import install as _install_moved_paths
from .artifact import LoadedModel, load
from .errors import (
    ArtifactError,
    BackendError,
    CaptureError,
    GraphoptError,
    InputSpecError,
    PassError,
    UnsupportedOpError,
    VerificationError,
)
from .specs import TensorSpec

_install_moved_paths()

__version__ = "0.1.0"

_LAZY = {
    "compile": ("graphopt.api", "compile"),
    "CompiledModel": ("graphopt.api", "CompiledModel"),
    "capture": ("graphopt.frontend.torch_export", "capture"),
    "Pass": ("graphopt.passes.base", "Pass"),
    "PassResult": ("graphopt.passes.base", "PassResult"),
    "PassContext": ("graphopt.passes.base", "PassContext"),
    "Tolerance": ("graphopt.passes.base", "Tolerance"),
    "PassManager": ("graphopt.passes.manager", "PassManager"),
    "passes": ("graphopt.passes", None),
    "models": ("graphopt.models", None),
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'graphopt' has no attribute '{name}'")
    import importlib
    module_name, attr = _LAZY[name]
    module = importlib.import_module(module_name)
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value
    return value


__all__ = ["compile", "load", "CompiledModel", "LoadedModel", "capture", "Pass", "PassResult", "PassContext",
           "Tolerance", "PassManager", "TensorSpec", "GraphoptError", "ArtifactError", "BackendError",
           "CaptureError", "InputSpecError", "PassError", "UnsupportedOpError", "VerificationError"]
