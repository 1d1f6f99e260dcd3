"""The backend contract, in two halves:

- lowering (needs torch): Backend.compile(captured) -> Executable, which runs the lowered
  model in process and writes its files into an artifact (save_files -> the manifest's
  backend section);
- loading (torch-free, the backend's runner module): load_runner(directory, backend_options,
  inputs, outputs, threads) -> an object with run(values) -> list of numpy arrays.

Both are named in graphopt.backends.BACKENDS; docs/writing_backends.md shows a whole backend.
"""
from __future__ import annotations

import os
import shutil
from typing import Any, Sequence

import torch

from ..frontend.torch_export import CapturedModel


class Executable:
    """A lowered model. `run` takes and returns torch tensors; `save_files` writes the
    backend's files into a directory and returns the manifest's backend section."""

    backend: str = ""

    def run(self, args: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    @property
    def reduced_precision(self) -> str | None:
        """What the backend computes below fp32 (said in the pass log with its quality cost), or None."""
        return None

    def save_files(self, directory: str) -> dict[str, Any]:
        raise NotImplementedError


class WorkdirExecutable(Executable):
    """An Executable whose files live in a temporary directory it owns: `run` goes through its
    numpy runner, `copy_files` puts the files into an artifact, the directory goes with it."""

    workdir: str = ""
    runner: Any = None

    def run(self, args: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        return tuple(torch.from_numpy(out) for out in self.runner.run(args))

    def copy_files(self, directory: str, names: Sequence[str] | None = None) -> None:
        for name in names if names is not None else sorted(os.listdir(self.workdir)):
            shutil.copy2(os.path.join(self.workdir, name), os.path.join(directory, name))

    def __del__(self, rmtree=shutil.rmtree):   # bound at definition: imports fail at interpreter exit
        if self.workdir:
            rmtree(self.workdir, ignore_errors=True)


class Backend:
    name: str = ""

    def compile(self, captured: CapturedModel, progress: bool = False,
                calibration: Sequence[tuple] | None = None) -> Executable:
        """Lower `captured`. `calibration`: compile()'s calibration batches (input tuples), for a
        lowering that learns from activations (the TVM int8 kernels' smoothing); others need none."""
        raise NotImplementedError
