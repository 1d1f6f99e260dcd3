"""Backends lower the IR and run it. Each backend is one file; `get_backend` finds it by name.

A backend never rewrites semantics: what it runs must match the IR within float rounding.
"""
from __future__ import annotations

import importlib

from ..errors import BackendError

_BACKENDS = {
    "torch": ("graphopt.backends.torch", "TorchBackend"),
    "onnxruntime": ("graphopt.backends.onnxruntime", "OnnxRuntimeBackend"),
    "tvm": ("graphopt.backends.tvm", "TvmBackend"),
}


def available() -> list[str]:
    return list(_BACKENDS)


def get_backend(name: str, **options):
    if name not in _BACKENDS:
        raise BackendError(f"unknown backend '{name}'; available: {', '.join(_BACKENDS)}")
    module, cls = _BACKENDS[name]
    return getattr(importlib.import_module(module), cls)(**options)
