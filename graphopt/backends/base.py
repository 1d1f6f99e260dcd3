"""The backend contract, in two halves:

- lowering (needs torch): Backend.compile(captured) -> Executable, which runs the lowered
  model in process and writes its files into an artifact (save_files -> the manifest's
  backend section);
- loading (torch-free, the backend's runner module): load_runner(directory, backend_options,
  inputs, outputs, threads) -> an object with run(values) -> list of numpy arrays.

Both are named in graphopt.backends.BACKENDS; docs/writing_backends.md shows a whole backend.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from ..frontend.torch_export import CapturedModel


class Executable:
    """A lowered model. `run` takes and returns torch tensors; `save_files` writes the
    backend's files into a directory and returns the manifest's backend section."""

    backend: str = ""

    def run(self, args: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def save_files(self, directory: str) -> dict[str, Any]:
        raise NotImplementedError


class Backend:
    name: str = ""

    def compile(self, captured: CapturedModel, progress: bool = False) -> Executable:
        raise NotImplementedError
