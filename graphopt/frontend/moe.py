"""Capture of mixture-of-experts blocks: each experts module runs as one graphopt.moe_experts op.

Hugging Face MoE models (Mixtral, Qwen2/3-MoE, DeepSeek-V3, OLMoE, ... : the classes that
transformers decorates with `use_experts_implementation`) keep their experts' weights as 3D
tensors and loop over the experts with data-dependent shapes (one_hot, nonzero, where,
index_add), which neither torch.export nor the backends take well. During capture each such
module's forward is swapped for one call of graphopt.ir.moe.moe_experts with the module's own
weights; the router before it stays the model's own ops. Expert layouts the op does not cover
(biases, transposed or interleaved weights, ungated experts, a post-expert norm, a custom
gate) raise CaptureError naming the module.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from ..errors import CaptureError
from ..ir.moe import MOE_EXPERTS

# transformers' activation modules by class name -> moe_experts's activation names.
_ACTIVATION_NAMES = {"SiLU": "silu", "SiLUActivation": "silu", "GELUActivation": "gelu", "GELU": "gelu",
                     "GELUTanh": "gelu_tanh", "NewGELUActivation": "gelu_tanh",
                     "PytorchGELUTanh": "gelu_tanh", "ReLU": "relu"}


def is_experts_module(module: torch.nn.Module) -> bool:
    """A transformers experts module (decorated with use_experts_implementation)."""
    return hasattr(module, "is_concatenated") and hasattr(module, "has_gate") and hasattr(module, "down_proj")


def _custom_gate(module: torch.nn.Module) -> bool:
    from transformers.integrations.moe import _default_apply_gate
    return getattr(type(module), "_apply_gate", _default_apply_gate) is not _default_apply_gate


def experts_activation(name: str, module: torch.nn.Module) -> str:
    """moe_experts's activation name for `module`, or CaptureError saying what is not covered."""
    kind = type(module).__name__
    unsupported = [what for what, bad in (
        ("biases", getattr(module, "has_bias", False)),
        ("transposed weights", getattr(module, "is_transposed", False)),
        ("interleaved gate/up weights", not getattr(module, "is_concatenated", True)),
        ("ungated experts", not getattr(module, "has_gate", True)),
        ("a post-expert norm", getattr(module, "has_post_expert_norm", False)),
        ("a custom gate function", _custom_gate(module))) if bad]
    if unsupported:
        raise CaptureError(f"MoE experts '{name}' ({kind}) use {', '.join(unsupported)}: graphopt's moe_experts op "
                           "covers gated experts with stacked [gate; up] and down weights only")
    activation = _ACTIVATION_NAMES.get(type(getattr(module, "act_fn", None)).__name__)
    if activation is None:
        raise CaptureError(f"MoE experts '{name}' ({kind}): activation {type(module.act_fn).__name__} has no "
                           f"moe_experts equivalent (known: {', '.join(sorted(set(_ACTIVATION_NAMES.values())))})")
    return activation


def _forward_as_op(module: torch.nn.Module, activation: str):
    def forward(hidden_states, top_k_index, top_k_weights):
        return MOE_EXPERTS(hidden_states, top_k_index.to(torch.int64), top_k_weights, module.gate_up_proj,
                           module.down_proj, activation)
    return forward


@contextlib.contextmanager
def experts_as_one_op(model: torch.nn.Module) -> Iterator[int]:
    """Within the block every experts module of `model` runs graphopt.moe_experts; yields how
    many were swapped."""
    swapped = []
    try:
        for name, module in model.named_modules():
            if is_experts_module(module):
                activation = experts_activation(name, module)
                module.forward = _forward_as_op(module, activation)
                swapped.append(module)
        yield len(swapped)
    finally:
        for module in swapped:
            del module.forward
