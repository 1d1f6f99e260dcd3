"""Apache TVM backend.

    lower.py       IR -> torch.export -> Relax -> a shared library for the CPU (needs torch)
    pipeline.py    weight packing (PackDenseWeights) and the CPU pass pipeline
    schedules.py   packed_dense, the LoopNest schedule rule and what they share
    intrinsics.py  the vectorizable float32 exp registered for LLVM
    runner.py      the torch-free side: targets, CPU features, TvmRunner, load_runner

`graphopt.backends.tvm.X` reads X from lower.py on first use (TvmBackend, import_relax,
CUSTOM_CONVERT_MAP, ...), so importing the runner never imports torch.
"""
from .._lazy import lower_attribute


def __getattr__(name: str):
    return lower_attribute(__name__, name)
