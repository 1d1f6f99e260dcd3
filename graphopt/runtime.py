"""Torch-free execution of lowered models: what a loaded artifact needs (numpy + onnxruntime,
or numpy + the TVM runtime)."""
from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

from .errors import BackendError
from .specs import TensorSpec, check_inputs


def to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor, without importing torch
        value = value.detach().cpu().contiguous().numpy()
    return np.ascontiguousarray(value)


class OrtRunner:
    """An onnxruntime InferenceSession with input checking against the captured specs."""

    def __init__(self, model_path: str, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec],
                 threads: int | None = None, optimization_level: str = "all"):
        import onnxruntime as ort
        levels = {"none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                  "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                  "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                  "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
        if optimization_level not in levels:
            raise BackendError(f"unknown onnxruntime optimization level '{optimization_level}'; "
                               f"use one of {', '.join(levels)}")
        options = ort.SessionOptions()
        options.graph_optimization_level = levels[optimization_level]
        options.intra_op_num_threads = threads or (os.cpu_count() or 1)
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(model_path, options, providers=["CPUExecutionProvider"])
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
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


TVM_LIBRARY = "model.so"
TVM_PARAMS = "params.bin"


def use_all_cores_for_tvm() -> None:
    """TVM sizes its thread pool, when first used, from TVM_NUM_THREADS or else half the
    logical CPUs (it assumes hyper-threading): one thread on a 2-core VM, which made SmolLM2
    2x slower. The pool can shrink later (runtime.config_threadpool) but never grow."""
    os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))


def host_target() -> dict:
    """The TVM target for this machine's CPU (LLVM with the host's features)."""
    use_all_cores_for_tvm()
    import tvm
    target = tvm.target.Target.from_device("cpu") if hasattr(tvm.target.Target, "from_device") else None
    mcpu = str(target.attrs.get("mcpu", "")) if target is not None else ""
    out = {"kind": "llvm", "num-cores": os.cpu_count() or 1}
    if mcpu:
        out["mcpu"] = mcpu
    return out


class TvmRunner:
    """A TVM shared library (Relax VM executable) plus its weights, with input checking.

    Needs numpy and the `tvm` runtime only; the weights file is TVM's parameter format."""

    def __init__(self, library_path: str, params_path: str, inputs: Sequence[TensorSpec],
                 outputs: Sequence[TensorSpec], threads: int | None = None):
        use_all_cores_for_tvm()
        import tvm
        from tvm.runtime import vm as tvm_vm
        if threads:
            tvm.get_global_func("runtime.config_threadpool")(0, int(threads))
        try:
            library = tvm.runtime.load_module(library_path)
            params = tvm.runtime.load_param_dict_from_file(params_path)
        except Exception as exc:  # noqa: BLE001 - TVM raises its own error types
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise BackendError(f"tvm could not load {library_path}: {first}") from exc
        self.device = tvm.cpu()
        self.vm = tvm_vm.VirtualMachine(library, self.device)
        self.params = [params[f"p{i}"] for i in range(len(params))]
        self.inputs = list(inputs)
        self.outputs = list(outputs)
        self._tensor = tvm.runtime.tensor

    def run(self, values: Sequence[Any]) -> list[np.ndarray]:
        check_inputs(self.inputs, values)
        args = [self._tensor(to_numpy(v), self.device) for v in values]
        out = self.vm["main"](*args, *self.params)
        outs = [out] if hasattr(out, "numpy") else [out[i] for i in range(len(out))]
        # zero-copy views that keep the TVM buffers alive (.numpy() copied 25 MB of logits: 2 ms)
        return [np.from_dlpack(o) for o in outs]
