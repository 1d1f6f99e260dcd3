"""Pipelines as declarative lists of pass factories. `preset(name)` returns fresh pass instances."""
from __future__ import annotations

from functools import partial

from ..errors import GraphoptError
from .constant_folding import ConstantFolding
from .dead_code import DeadCodeElimination
from .horizontal_fusion import HorizontalFusion
from .weight_quantization import WeightQuantization

# The measurements behind each preset: docs/measurements/decisions.md.
# int8 weight-only, fp32 compute in ONNX Runtime (accuracy_level 0).
_INT8 = partial(WeightQuantization, bits=8, group_size=None, accuracy_level=0)
# int4 g32 on the exact block range with a float minimum per block (llama.cpp's Q4_1 grid),
# embeddings and the (tied) LM head int8 g32 symmetric (Q8_0's grid), scales in float16:
# SmolLM2's GGUF weights come back exactly. Horizontal fusion first (q/k/v and gate/up as one
# matmul each, the same blocks): fewer, wider MatMulNBits and offset products per layer.
_INT4 = partial(WeightQuantization, bits=4, group_size=32, method="rtn", grid="offset", scale_dtype="float16",
                head_group_size=32, head_grid="symmetric")
# int4 g64 with range clipping and super weights restored: GPTQ when compile() gets
# calibration batches, round-to-nearest otherwise; embeddings and the (tied) LM head int8.
_INT4_GPTQ = partial(WeightQuantization, bits=4, group_size=64, method="auto", clip="mse",
                     restore_super_weights=True)

# Horizontal fusion is not in "default" (it measured slower on ONNX Runtime); it is the
# opt-in "fuse".
PRESETS = {
    "none": [],
    "default": [ConstantFolding, DeadCodeElimination],
    "fuse": [ConstantFolding, HorizontalFusion, DeadCodeElimination],
    "int8": [ConstantFolding, _INT8, DeadCodeElimination],
    "int4": [ConstantFolding, HorizontalFusion, _INT4, DeadCodeElimination],
    "int4-gptq": [ConstantFolding, _INT4_GPTQ, DeadCodeElimination],
}


def preset(name: str):
    if name not in PRESETS:
        raise GraphoptError(f"unknown preset '{name}'; available: {', '.join(PRESETS)}")
    return [factory() for factory in PRESETS[name]]
