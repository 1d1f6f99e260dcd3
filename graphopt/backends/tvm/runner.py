"""TVM's torch-free side: targets, the CPU features a library needs, and the runner a loaded
artifact calls (numpy + the TVM runtime only)."""
from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

from ...errors import ArtifactError, BackendError
from ...runtime import default_threads, to_numpy
from ...specs import TensorSpec, check_inputs

TVM_LIBRARY = "model.so"
TVM_PARAMS = "params.bin"


def use_all_cores_for_tvm() -> None:
    """TVM sizes its thread pool, when first used, from TVM_NUM_THREADS or else half the
    logical CPUs (it assumes hyper-threading): one thread on a 2-core VM, which made SmolLM2
    2x slower. So it is set to default_threads(). The pool can shrink later
    (runtime.config_threadpool) but never grow."""
    os.environ.setdefault("TVM_NUM_THREADS", str(default_threads()))


def import_tvm_runtime():
    """`import tvm` for running a library. tvm_ffi imports torch when it is installed (+250 MB
    of memory and ~1 s in a process that runs an artifact); where torch is not loaded yet it is
    kept out (a process that loaded torch first, as compiling does, is left as it is)."""
    import sys
    if "tvm" in sys.modules or "torch" in sys.modules:
        import tvm
        return tvm
    sys.modules["torch"] = None          # type: ignore[assignment]  # `import torch` raises ImportError
    try:
        import tvm
    finally:
        if "torch" in sys.modules and sys.modules["torch"] is None:
            del sys.modules["torch"]
    return tvm


# The x86-64 micro-architecture levels (x86-64 psABI), as Linux /proc/cpuinfo flag names;
# each level includes the ones before it.
X86_64_LEVELS = {
    "x86-64-v2": ("cx16", "lahf_lm", "popcnt", "pni", "sse4_1", "sse4_2", "ssse3"),
    "x86-64-v3": ("avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"),
    "x86-64-v4": ("avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"),
}
# Instruction-set flags LLVM may emit for a host-specific CPU (-mcpu=znver4, ...).
ISA_FLAGS = frozenset(f for level in X86_64_LEVELS.values() for f in level) | {
    "sse", "sse2", "avx512_bf16", "avx512_vnni", "avx512vbmi", "avx512_vbmi2", "avx512ifma", "avx512_bitalg",
    "avx512_vpopcntdq", "avx512_fp16", "avx_vnni", "amx_bf16", "amx_int8", "amx_tile", "gfni", "vaes",
    "vpclmulqdq", "sha_ni", "adx"}


def cpu_flags() -> frozenset[str] | None:
    """This CPU's feature flags (Linux /proc/cpuinfo), or None where they cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        return None
    return None


def required_cpu_features(target: dict) -> list[str] | None:
    """The CPU flags code built for `target` may use: a named x86-64 level's, else (a
    host-specific -mcpu) every instruction-set flag of the building machine."""
    mcpu = target.get("mcpu", "")
    if mcpu in X86_64_LEVELS:
        names = list(X86_64_LEVELS)
        return sorted(f for level in names[: names.index(mcpu) + 1] for f in X86_64_LEVELS[level])
    flags = cpu_flags()
    return sorted(flags & ISA_FLAGS) if flags is not None else None


def check_cpu_features(required: Sequence[str] | None, what: str) -> None:
    """Raise BackendError naming the flags in `required` this CPU lacks."""
    flags = cpu_flags()
    if not required or flags is None:
        return
    missing = sorted(set(required) - flags)
    if missing:
        raise BackendError(f"{what} needs CPU features this machine lacks: {', '.join(missing)}; recompile it here, "
                           "or compile with backend option target='x86-64-v3' (AVX2) for a portable library")


def tvm_target(target: dict | str | None) -> dict:
    """A TVM target dict from None / 'host' (this CPU), an x86-64 level name, or a dict."""
    if isinstance(target, dict):
        return dict(target)
    if target in (None, "host"):
        return host_target()
    if target in X86_64_LEVELS:
        return {"kind": "llvm", "num-cores": os.cpu_count() or 1, "mcpu": target}
    raise BackendError(f"unknown TVM target '{target}'; use 'host', {', '.join(map(repr, X86_64_LEVELS))} "
                       "or a TVM target dict")


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


def rotary_table(kind: str, inv_freq, positions: int, scaling: float = 1.0) -> np.ndarray:
    """cos or sin of position x frequency [positions, len(inv_freq)] as a generation graph computes
    it (the product in float32), each value rounded once from float64."""
    angles = np.arange(positions, dtype=np.float32)[:, None] * np.asarray(inv_freq, dtype=np.float32)[None]
    table = (np.cos if kind == "cos" else np.sin)(angles.astype(np.float64)) * scaling
    return table.astype(np.float32)


def derived_param(recipe: dict) -> np.ndarray:
    """A weight the artifact stores as a recipe (manifest "derived_params") instead of its values."""
    if recipe.get("kind") not in ("rotary_cos", "rotary_sin"):
        raise ArtifactError(f"unknown derived parameter {recipe.get('kind')!r}; recompile with this graphopt")
    return rotary_table(recipe["kind"][len("rotary_"):], recipe["inv_freq"], int(recipe["positions"]),
                        float(recipe.get("scaling", 1.0)))


class TvmRunner:
    """A TVM shared library (Relax VM executable) plus its weights, with input checking.

    Needs numpy and the `tvm` runtime only; the weights file is TVM's parameter format."""

    def __init__(self, library_path: str, params_path: str, inputs: Sequence[TensorSpec],
                 outputs: Sequence[TensorSpec], threads: int | None = None, derived: dict | None = None):
        use_all_cores_for_tvm()
        tvm = import_tvm_runtime()
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
        params = dict(params)
        for name, recipe in (derived or {}).items():
            params[name] = tvm.runtime.tensor(derived_param(recipe), self.device)
        self.params = [params[f"p{i}"] for i in range(len(params))]
        self.inputs = list(inputs)
        self.outputs = list(outputs)
        self._tensor = tvm.runtime.tensor

    def tensor(self, array: np.ndarray):
        """A TVM tensor on this runner's device holding a copy of `array`."""
        return self._tensor(array, self.device)

    def call(self, tensors: Sequence[Any]) -> list:
        """main(*tensors, *weights) without checks or copies: its outputs as TVM tensors."""
        out = self.vm["main"](*tensors, *self.params)
        return [out] if hasattr(out, "numpy") else [out[i] for i in range(len(out))]

    def run(self, values: Sequence[Any]) -> list[np.ndarray]:
        check_inputs(self.inputs, values)
        outs = self.call([self._tensor(to_numpy(v), self.device) for v in values])
        # zero-copy views that keep the TVM buffers alive (.numpy() copies)
        return [np.from_dlpack(o) for o in outs]


def load_runner(directory: str, options: dict[str, Any], inputs: Sequence[TensorSpec],
                outputs: Sequence[TensorSpec], threads: int | None = None) -> TvmRunner:
    """The runner of an artifact's files (`options`: the manifest's backend section), after
    checking that this CPU has the features the library was built for."""
    built_for = (options.get("target") or {}).get("mcpu")
    if "cpu_features" not in options:
        raise ArtifactError(f"artifact {directory}: its manifest does not say which CPU features the TVM library "
                            f"(built for '{built_for}') needs; recompile it with this graphopt")
    try:
        check_cpu_features(options["cpu_features"], f"artifact {directory} (TVM, built for CPU '{built_for}')")
    except BackendError as exc:
        raise ArtifactError(str(exc)) from None
    return TvmRunner(os.path.join(directory, options.get("library", TVM_LIBRARY)),
                     os.path.join(directory, options.get("params", TVM_PARAMS)), inputs, outputs,
                     threads or options.get("threads"), options.get("derived_params"))
