"""OpenVINO backend: IR -> ONNX (the onnxruntime backend's export, graphopt's translations
included) -> openvino.convert_model -> model.xml + model.bin, compiled for the CPU with a
precision hint (runner.PRECISIONS). The artifact runs with numpy + openvino only."""
from __future__ import annotations

import os
import shutil
import tempfile

from ...errors import BackendError
from ...frontend.torch_export import CapturedModel
from ..base import Backend, WorkdirExecutable
from ..onnxruntime.lower import DEFAULT_OPSET, export_onnx
from .runner import MODEL_FILE, PRECISIONS, OpenVinoRunner


class OpenVinoExecutable(WorkdirExecutable):
    backend = "openvino"

    def __init__(self, workdir: str, captured: CapturedModel, threads: int | None, precision: str):
        self.workdir = workdir
        self.threads = threads
        self.precision = precision
        self.runner = OpenVinoRunner(os.path.join(workdir, MODEL_FILE), captured.inputs, captured.outputs,
                                     threads, precision)

    @property
    def reduced_precision(self):
        resolved = self.runner.precision
        return None if resolved == "f32" else f"OpenVINO inference precision {resolved} (hint '{self.precision}')"

    def save_files(self, directory):
        self.copy_files(directory)
        return {"model": MODEL_FILE, "threads": self.threads, "precision": self.precision,
                "precision_on_compile_host": self.runner.precision}


class OpenVinoBackend(Backend):
    name = "openvino"

    def __init__(self, threads: int | None = None, precision: str = "f32", opset: int | None = DEFAULT_OPSET):
        if precision not in PRECISIONS:
            raise BackendError(f"unknown OpenVINO precision '{precision}'; use one of {', '.join(PRECISIONS)}")
        self.threads = threads
        self.precision = precision
        self.opset = opset

    def compile(self, captured, progress=False, calibration=None):
        try:
            import openvino as ov
        except ImportError as exc:
            raise BackendError("backend 'openvino' needs the openvino package (pip install openvino)") from exc
        workdir = tempfile.mkdtemp(prefix="graphopt-ov-")
        try:
            with tempfile.TemporaryDirectory(prefix="graphopt-ov-onnx-") as onnx_dir:
                onnx_path = os.path.join(onnx_dir, "model.onnx")
                export_onnx(captured, onnx_path, self.opset)
                try:
                    model = ov.convert_model(onnx_path)
                except Exception as exc:  # noqa: BLE001 - the converter raises OpConversionFailure and friends
                    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                    raise BackendError(f"OpenVINO could not convert the ONNX export: {first}") from exc
                ov.save_model(model, os.path.join(workdir, MODEL_FILE), compress_to_fp16=False)
            return OpenVinoExecutable(workdir, captured, self.threads, self.precision)
        except BaseException:
            shutil.rmtree(workdir, ignore_errors=True)
            raise
