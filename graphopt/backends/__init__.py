"""Backends lower the IR and run it: one package each (a single file for the torch reference),
one line each in BACKENDS. A backend's `lower` side implements the contract in base.py
(compile -> Executable, which saves its files); its `runner` side loads those files without
torch, and is what graphopt.load() calls. docs/writing_backends.md walks through adding one.

A backend never rewrites semantics: what it runs must match the IR within float rounding.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable

from ..errors import ArtifactError, BackendError

# name: (the Backend class, "module:name"; the torch-free loader of its artifacts or None)
BACKENDS = {
    "torch":       ("graphopt.backends.torch:TorchBackend", None),
    "onnxruntime": ("graphopt.backends.onnxruntime.lower:OnnxRuntimeBackend",
                    "graphopt.backends.onnxruntime.runner:load_runner"),
    "tvm":         ("graphopt.backends.tvm.lower:TvmBackend", "graphopt.backends.tvm.runner:load_runner"),
    "openvino":    ("graphopt.backends.openvino.lower:OpenVinoBackend",
                    "graphopt.backends.openvino.runner:load_runner"),
}


def _resolve(reference: str):
    module, _, name = reference.partition(":")
    return getattr(importlib.import_module(module), name)


def available() -> list[str]:
    return list(BACKENDS)


def get_backend(name: str, **options):
    if name not in BACKENDS:
        raise BackendError(f"unknown backend '{name}'; available: {', '.join(BACKENDS)}")
    return _resolve(BACKENDS[name][0])(**options)


def runner_loader(name: str, directory: str) -> Callable[..., Any]:
    """load_runner(directory, backend_options, inputs, outputs, threads) of backend `name`,
    whose artifact is `directory`."""
    loader = BACKENDS.get(name, (None, None))[1]
    if loader is None:
        raise ArtifactError(f"artifact {directory}: backend '{name}' cannot be loaded by this graphopt")
    return _resolve(loader)
