"""Backends lower the IR and run it. Each backend is one file; `get_backend` finds it by name.

A backend never rewrites semantics: what it runs must match the IR within float rounding.
"""
from __future__ import annotations

import importlib

from ..errors import BackendError

_BACKENDS = {
    "torch": ("graphopt.backends.torch", "TorchBackend"),
    "onnxruntime": ("graphopt.backends.onnxruntime", "OnnxRuntimeBackend"),
}
_PLANNED = {"tvm": "the TVM backend is not implemented yet (see the README's status table)"}


def available() -> list[str]:
    return list(_BACKENDS)


def get_backend(name: str, **options):
    if name in _PLANNED:
        raise BackendError(f"backend '{name}': {_PLANNED[name]}; available: {', '.join(_BACKENDS)}")
    if name not in _BACKENDS:
        raise BackendError(f"unknown backend '{name}'; available: {', '.join(_BACKENDS)}")
    module, cls = _BACKENDS[name]
    return getattr(importlib.import_module(module), cls)(**options)
