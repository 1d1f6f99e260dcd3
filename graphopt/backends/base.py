"""The backend contract: Backend.compile(captured) -> Executable (run + save)."""
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
