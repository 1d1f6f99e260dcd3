"""What every torch-free runner shares: inputs as numpy arrays, and the thread count a
runtime uses when not told. The runners themselves live with their backends
(graphopt.backends.onnxruntime.runner, graphopt.backends.tvm.runner); their old names here
import with a DeprecationWarning for one release."""
from __future__ import annotations

import importlib
import os
import warnings
from typing import Any

import numpy as np

from .errors import GraphoptError


def to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor, without importing torch
        value = value.detach().cpu().contiguous().numpy()
    array = np.asarray(value)
    return array if array.flags.c_contiguous else np.ascontiguousarray(array)   # (which makes 0-d arrays 1-d)


def default_threads() -> int:
    """Threads a runtime uses when not told: $GRAPHOPT_NUM_THREADS, else every CPU."""
    value = os.environ.get("GRAPHOPT_NUM_THREADS")
    if value is None:
        return os.cpu_count() or 1
    if not value.isdigit() or int(value) < 1:
        raise GraphoptError(f"GRAPHOPT_NUM_THREADS must be a positive integer, got {value!r}")
    return int(value)


_ORT_RUNNER = "graphopt.backends.onnxruntime.runner"
_TVM_RUNNER = "graphopt.backends.tvm.runner"
MOVED_NAMES = {**{name: _ORT_RUNNER for name in ("ORT_LEVELS", "ort_session_options", "OrtRunner")},
               **{name: _TVM_RUNNER for name in ("TVM_LIBRARY", "TVM_PARAMS", "use_all_cores_for_tvm", "X86_64_LEVELS",
                                                 "ISA_FLAGS", "cpu_flags", "required_cpu_features",
                                                 "check_cpu_features", "tvm_target", "host_target", "TvmRunner")}}


def __getattr__(name: str):
    if name not in MOVED_NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn(f"graphopt.runtime.{name} moved to {MOVED_NAMES[name]}.{name}; the old name goes in the next "
                  "release", DeprecationWarning, stacklevel=2)
    return getattr(importlib.import_module(MOVED_NAMES[name]), name)
