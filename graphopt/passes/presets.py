"""Pipelines as declarative lists of passes. `preset(name)` returns fresh pass instances."""
from __future__ import annotations

from ..errors import GraphoptError
from .constant_folding import ConstantFolding
from .dead_code import DeadCodeElimination
from .horizontal_fusion import HorizontalFusion

# Horizontal fusion is not in "default": measured on SmolLM2 with ONNX Runtime (2 threads),
# the wider MatMul runs at the same GFLOP/s as the separate ones and the Split after it
# copies its outputs, so it cost 5-8% of prefill latency. It is kept as the opt-in "fuse".
PRESETS = {
    "none": [],
    "default": [ConstantFolding, DeadCodeElimination],
    "fuse": [ConstantFolding, HorizontalFusion, DeadCodeElimination],
}


def preset(name: str):
    if name not in PRESETS:
        raise GraphoptError(f"unknown preset '{name}'; available: {', '.join(PRESETS)}")
    return [cls() for cls in PRESETS[name]]
