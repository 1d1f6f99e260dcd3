"""The reference backend: runs the IR itself in torch. In-process only (no artifact)."""
from __future__ import annotations

import torch

from ..errors import BackendError
from ..frontend.torch_export import CapturedModel
from .base import Backend, Executable


class TorchExecutable(Executable):
    backend = "torch"

    def __init__(self, captured: CapturedModel):
        self.captured = captured

    def run(self, args):
        with torch.no_grad():
            return tuple(self.captured.graph_module(*args))

    def save_files(self, directory):
        raise BackendError("the torch backend is the in-process reference and has no deployable "
                           "artifact; compile with backend='onnxruntime' to save")


class TorchBackend(Backend):
    name = "torch"

    def compile(self, captured, progress=False, calibration=None):
        return TorchExecutable(captured)
