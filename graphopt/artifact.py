"""Artifacts: a self-describing directory (lowered model files + manifest.json).

Loading needs only numpy and the backend's runtime (onnxruntime or TVM's): this module imports
neither torch nor pickle, and checks every file's size and sha256 before using it.
"""
from __future__ import annotations

import ctypes
import datetime
import errno
import hashlib
import json
import os
import platform
import shutil
import tempfile
from importlib import metadata
from typing import Any

from .backends import runner_loader
from .errors import ArtifactError
from .specs import TensorSpec

FORMAT = "graphopt-artifact"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def directory_bytes(directory: str) -> int:
    """Bytes of the files directly in `directory` (an artifact's size)."""
    return sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory))


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("graphopt", "torch", "onnx", "onnxruntime", "onnxscript", "transformers", "numpy", "apache-tvm"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def _exchange(a: str, b: str) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where the OS or
    the filesystem cannot."""
    rename_at2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if rename_at2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if rename_at2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), b)


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _move_into_place(staging: str, directory: str) -> None:
    """Put the finished `staging` directory at `directory` so that, whatever fails or kills
    the process, `directory` holds either the old artifact or the new one."""
    if not os.path.exists(directory):
        os.rename(staging, directory)
    elif _exchange(staging, directory):
        shutil.rmtree(staging, ignore_errors=True)      # staging now holds the old artifact
    else:
        # No atomic swap here: move the old artifact aside and back again on failure; a
        # process killed between the two renames leaves it at OLD, which load() restores.
        old = directory + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(directory, old)
        try:
            os.rename(staging, directory)
        except BaseException:
            os.rename(old, directory)
            raise
        shutil.rmtree(old, ignore_errors=True)
    _fsync_path(os.path.dirname(directory))


def _restore_interrupted_save(directory: str) -> None:
    old = directory + ".old"
    if not os.path.exists(directory) and os.path.isfile(os.path.join(old, MANIFEST)):
        os.rename(old, directory)


def save(compiled, directory: str) -> str:
    """Write `compiled` to `directory`: into a temporary sibling, flushed to disk, then swapped
    in, so a failure at any step leaves the old artifact (or the new one) at the path."""
    directory = os.path.abspath(directory)
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.", dir=parent)
    try:
        backend_info = compiled.executable.save_files(staging)
        for name, data in (getattr(compiled, "extra_files", None) or {}).items():
            with open(os.path.join(staging, name), "wb") as f:
                f.write(data)
        files = {name: {"bytes": os.path.getsize(os.path.join(staging, name)),
                        "sha256": _sha256(os.path.join(staging, name))}
                 for name in sorted(os.listdir(staging))}
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "backend": compiled.backend,
            "backend_options": backend_info,
            "inputs": [s.to_json() for s in compiled.inputs],
            "outputs": [s.to_json() for s in compiled.outputs],
            "passes": [r.to_json() for r in compiled.records],
            "stats": compiled.stats,
            **({"task": compiled.task} if getattr(compiled, "task", None) else {}),
            "versions": _versions(),
            "files": files,
        }
        with open(os.path.join(staging, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=2)
        for name in list(files) + [MANIFEST, "."]:
            _fsync_path(os.path.join(staging, name))
        _move_into_place(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


def read_manifest(directory: str) -> dict[str, Any]:
    path = os.path.join(directory, MANIFEST)
    if not os.path.isdir(directory):
        raise ArtifactError(f"artifact {directory}: no such directory")
    if not os.path.isfile(path):
        raise ArtifactError(f"artifact {directory}: {MANIFEST} is missing (not a graphopt artifact?)")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"artifact {directory}: {MANIFEST} is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"artifact {directory}: {MANIFEST} is not a graphopt manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"artifact {directory}: format version {manifest.get('format_version')} "
                            f"is not supported (this graphopt reads {FORMAT_VERSION})")
    for key in ("backend", "inputs", "outputs", "files"):
        if key not in manifest:
            raise ArtifactError(f"artifact {directory}: {MANIFEST} lacks '{key}'")
    return manifest


def verify_files(directory: str, manifest: dict[str, Any]) -> None:
    for name, info in manifest["files"].items():
        path = os.path.join(directory, name)
        if os.path.basename(name) != name:
            raise ArtifactError(f"artifact {directory}: file name '{name}' escapes the directory")
        if not os.path.isfile(path):
            raise ArtifactError(f"artifact {directory}: {name} is missing")
        size = os.path.getsize(path)
        if size != info["bytes"]:
            raise ArtifactError(f"artifact {directory}: {name} is truncated or altered "
                                f"({size} bytes, manifest says {info['bytes']})")
        if _sha256(path) != info["sha256"]:
            raise ArtifactError(f"artifact {directory}: {name} is corrupted (sha256 mismatch)")


class LoadedModel:
    """An artifact ready to run. Call it with numpy arrays (or torch tensors, if torch is
    installed); it returns the same kind."""

    def __init__(self, directory: str, manifest: dict[str, Any], runner):
        self.directory = directory
        self.manifest = manifest
        self.runner = runner
        self.inputs = [TensorSpec.from_json(s) for s in manifest["inputs"]]
        self.outputs = [TensorSpec.from_json(s) for s in manifest["outputs"]]

    @property
    def task(self) -> str | None:
        """'text-generation' for a generation artifact, None for a forward pass."""
        return (self.manifest.get("task") or {}).get("name")

    def generate(self, prompt, **options):
        """Generated text for `prompt` (see graphopt.generation.TextGenerator.generate)."""
        if getattr(self, "_generator", None) is None:
            from .generation import generator_for
            self._generator = generator_for(self.directory, self.manifest, self.runner)
        return self._generator.generate(prompt, **options)

    @property
    def generation_stats(self):
        """Counts and rates of the last generate() call (graphopt.generation.GenerationStats)."""
        if getattr(self, "_generator", None) is None:
            raise ArtifactError(f"artifact {self.directory}: generate() has not run")
        return self._generator.stats

    def __call__(self, *args):
        outs = self.runner.run(args)
        if args and hasattr(args[0], "detach"):
            import torch
            outs = [torch.from_numpy(o) for o in outs]
        return outs[0] if len(outs) == 1 else tuple(outs)


def load(directory: str, threads: int | None = None) -> LoadedModel:
    """Load an artifact directory written by CompiledModel.save()."""
    directory = os.path.abspath(directory)
    _restore_interrupted_save(directory)
    manifest = read_manifest(directory)
    verify_files(directory, manifest)
    inputs = [TensorSpec.from_json(s) for s in manifest["inputs"]]
    outputs = [TensorSpec.from_json(s) for s in manifest["outputs"]]
    load_runner = runner_loader(manifest["backend"], directory)
    runner = load_runner(directory, manifest.get("backend_options") or {}, inputs, outputs, threads)
    return LoadedModel(directory, manifest, runner)
