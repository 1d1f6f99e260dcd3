"""Pipelines as declarative lists of passes. `preset(name)` returns fresh pass instances."""
from __future__ import annotations

from ..errors import GraphoptError
from .constant_folding import ConstantFolding
from .dead_code import DeadCodeElimination
from .horizontal_fusion import HorizontalFusion

PRESETS = {
    "none": [],
    "default": [ConstantFolding, HorizontalFusion, DeadCodeElimination],
}


def preset(name: str):
    if name not in PRESETS:
        raise GraphoptError(f"unknown preset '{name}'; available: {', '.join(PRESETS)}")
    return [cls() for cls in PRESETS[name]]
