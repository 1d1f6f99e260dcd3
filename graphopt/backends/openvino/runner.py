"""OpenVINO's torch-free side: the precision hints graphopt offers and the runner a loaded
artifact calls (numpy + openvino only)."""
from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

from ...errors import BackendError
from ...runtime import default_threads, to_numpy
from ...specs import TensorSpec, check_inputs

MODEL_FILE = "model.xml"
# graphopt's names -> OpenVINO's INFERENCE_PRECISION_HINT; "default" leaves the plugin's own
# choice (bf16 on CPUs with AVX-512 BF16 or AMX, f32 elsewhere).
PRECISIONS = {"f32": "f32", "bf16": "bf16", "f16": "f16", "default": None}


def compile_options(threads: int, precision: str) -> dict[str, Any]:
    """compile_model properties: thread count and precision hint."""
    if precision not in PRECISIONS:
        raise BackendError(f"unknown OpenVINO precision '{precision}'; use one of {', '.join(PRECISIONS)}")
    options: dict[str, Any] = {"INFERENCE_NUM_THREADS": int(threads)}
    if PRECISIONS[precision] is not None:
        options["INFERENCE_PRECISION_HINT"] = PRECISIONS[precision]
    if precision == "f32":          # no int8 activations for compressed weights: f32 means f32 arithmetic
        options["DYNAMIC_QUANTIZATION_GROUP_SIZE"] = 0
    return options


class OpenVinoRunner:
    """An OpenVINO CompiledModel on the CPU with input checking against the captured specs."""

    def __init__(self, model_path: str, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec],
                 threads: int | None = None, precision: str = "f32"):
        import openvino as ov
        core = ov.Core()
        threads = threads or default_threads()
        if threads == 1 and precision in ("bf16", "default") and "BF16" in core.get_property(
                "CPU", "OPTIMIZATION_CAPABILITIES"):
            # Measured: OpenVINO 2026.4's CPU plugin dies with SIGFPE in compile_model here.
            raise BackendError(f"OpenVINO {ov.__version__} crashes (SIGFPE) compiling bf16 with one thread on this "
                               "CPU; use threads >= 2 or precision='f32'")
        options = compile_options(threads, precision)
        try:
            self.compiled = core.compile_model(model_path, "CPU", options)
        except Exception as exc:  # noqa: BLE001 - OpenVINO raises RuntimeError with multi-line text
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise BackendError(f"OpenVINO could not compile {os.path.basename(model_path)}: {first}") from exc
        self.request = self.compiled.create_infer_request()
        self.inputs = list(inputs)
        self.outputs = list(outputs)
        if len(self.compiled.inputs) != len(self.inputs):
            raise BackendError(f"{model_path} has {len(self.compiled.inputs)} inputs, "
                               f"the specs name {len(self.inputs)}")

    @property
    def precision(self) -> str:
        """The precision the plugin runs at (what "default" resolved to on this CPU)."""
        hint = self.compiled.get_property("INFERENCE_PRECISION_HINT")
        return hint.get_type_name() if hasattr(hint, "get_type_name") else str(hint)

    def run(self, values: Sequence[Any]) -> list[np.ndarray]:
        check_inputs(self.inputs, values)
        # share_outputs=False: the arrays are already copies (the request reuses its buffers)
        results = self.request.infer([np.ascontiguousarray(to_numpy(v)) for v in values], share_inputs=True,
                                     share_outputs=False)
        return [results[output] for output in self.compiled.outputs]


def load_runner(directory: str, options: dict[str, Any], inputs: Sequence[TensorSpec],
                outputs: Sequence[TensorSpec], threads: int | None = None) -> OpenVinoRunner:
    """The runner of an artifact's files (`options`: the manifest's backend section)."""
    return OpenVinoRunner(os.path.join(directory, options.get("model", MODEL_FILE)), inputs, outputs,
                          threads or options.get("threads"), options.get("precision", "f32"))
