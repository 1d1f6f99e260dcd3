"""Old module paths kept for one release: importing one gives the module at its new path and a
DeprecationWarning naming it (docs/layout.md lists every move)."""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

MOVED = {
    "graphopt.ir.capture": "graphopt.frontend.torch_export",
    "graphopt.ir.onnx_import": "graphopt.frontend.onnx",
    "graphopt.ir.decode": "graphopt.frontend.decode",
    "graphopt.ir.generation": "graphopt.frontend.generation",
    "graphopt.backends.onnx_translations": "graphopt.backends.onnxruntime.translations",
    "graphopt.backends.tvm_pipeline": "graphopt.backends.tvm.pipeline",
    "graphopt.backends.tvm_schedules": "graphopt.backends.tvm.schedules",
    "graphopt.backends.tvm_intrinsics": "graphopt.backends.tvm.intrinsics",
}


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        new = MOVED[spec.name]
        warnings.warn(f"{spec.name} moved to {new}; the old path goes in the next release", DeprecationWarning,
                      stacklevel=2)
        return importlib.import_module(new)

    def exec_module(self, module) -> None:
        pass


def install() -> None:
    if not any(isinstance(finder, _Alias) for finder in sys.meta_path):
        sys.meta_path.append(_Alias())
