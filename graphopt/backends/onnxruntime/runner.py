"""ONNX Runtime's torch-free side: session options and the runner a loaded artifact calls
(numpy + onnxruntime only)."""
from __future__ import annotations

import os
import re
from typing import Any, Sequence

import numpy as np

from ...errors import BackendError, UnsupportedOpError
from ...runtime import default_threads, to_numpy
from ...specs import TensorSpec, check_inputs

MODEL_FILE = "model.onnx"
# Per-node metadata of the graphs lower.py writes, read by graphopt.report: the model's source
# line, and torch.onnx's namespace cut to the innermost module scope and the node.
SOURCE_KEY = "graphopt.source"
NAMESPACE_KEY = "namespace"

# graphopt's names of ONNX Runtime's graph optimization levels.
ORT_LEVELS = {"none": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
              "all": "ORT_ENABLE_ALL"}


def ort_session_options(threads: int, optimization_level: str = "all"):
    """SessionOptions with `threads` intra-op threads, a level from ORT_LEVELS, warnings off."""
    import onnxruntime as ort
    if optimization_level not in ORT_LEVELS:
        raise BackendError(f"unknown onnxruntime optimization level '{optimization_level}'; "
                           f"use one of {', '.join(ORT_LEVELS)}")
    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, ORT_LEVELS[optimization_level])
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return options


class OrtRunner:
    """An onnxruntime InferenceSession with input checking against the captured specs."""

    def __init__(self, model_path: str, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec],
                 threads: int | None = None, optimization_level: str = "all"):
        import onnxruntime as ort
        options = ort_session_options(threads or default_threads(), optimization_level)
        try:
            self.session = ort.InferenceSession(model_path, options, providers=["CPUExecutionProvider"])
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            missing = re.search(r"Could not find an implementation for (\w+)\((\d+)\) node with name '([^']*)'", first)
            if missing:
                op, version, node = missing.groups()
                raise UnsupportedOpError(f"onnxruntime has no CPU kernel for {op} (opset {version}) with the input "
                                         f"types of node '{node}' in {os.path.basename(model_path)}") from exc
            raise BackendError(f"onnxruntime could not load {model_path}: {first}") from exc
        self.inputs = list(inputs)
        self.outputs = list(outputs)
        self.input_names = [i.name for i in self.session.get_inputs()]
        if len(self.input_names) != len(self.inputs):
            raise BackendError(f"{model_path} has {len(self.input_names)} inputs, the specs name {len(self.inputs)}")

    def run(self, values: Sequence[Any]) -> list[np.ndarray]:
        check_inputs(self.inputs, values)
        feed = {name: to_numpy(v) for name, v in zip(self.input_names, values)}
        return self.session.run(None, feed)


def load_runner(directory: str, options: dict[str, Any], inputs: Sequence[TensorSpec],
                outputs: Sequence[TensorSpec], threads: int | None = None) -> OrtRunner:
    """The runner of an artifact's files (`options`: the manifest's backend section)."""
    return OrtRunner(os.path.join(directory, options.get("model", MODEL_FILE)), inputs, outputs,
                     threads or options.get("threads"), options.get("optimization_level", "all"))
