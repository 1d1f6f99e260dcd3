"""RMSNorm as one graphopt op, for backends with a kernel for it.

    y = torch.ops.graphopt.rms_norm(x, weight, eps)     # weight * (x * rsqrt(mean(x**2, -1) + eps))

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
