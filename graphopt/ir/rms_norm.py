"""RMSNorm as one graphopt op, for backends with a kernel for it.

    y = torch.ops.graphopt.rms_norm(x, weight, eps)     # weight * (x * rsqrt(mean(x**2, -1) + eps))
    total, y = torch.ops.graphopt.residual_rms_norm(x, residual, weight, eps)   # the add before it too

Hugging Face writes RMSNorm as five ops (square, mean, add, rsqrt, two products); the TVM
backend's importer cannot fuse the square into the mean, so it ran as separate kernels with a
scalar reduction. As this op it lowers to one kernel (kernels/rms_norm.c). The torch
implementation, in Hugging Face's order of operations, is the reference.
"""
from __future__ import annotations

import torch


@torch.library.custom_op("graphopt::rms_norm", mutates_args=())
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


@rms_norm.register_fake
def _rms_norm_fake(x, weight, eps):
    return torch.empty_like(x)


RMS_NORM = torch.ops.graphopt.rms_norm.default


@torch.library.custom_op("graphopt::residual_rms_norm", mutates_args=())
def residual_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                      eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + residual, rms_norm(x + residual)): a transformer's residual add and the norm after it."""
    total = x + residual
    return total, rms_norm(total, weight, eps)


@residual_rms_norm.register_fake
def _residual_rms_norm_fake(x, residual, weight, eps):
    return torch.empty_like(x), torch.empty_like(x)


RESIDUAL_RMS_NORM = torch.ops.graphopt.residual_rms_norm.default
