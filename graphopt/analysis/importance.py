"""Layer importance for mixed precision (Layer-wise mixed precision, 2024): which layers can
take fewer bits. Read-only.

    lim_scores(gm, calibration)  LIM = -cos(sublayer input stream, output stream), from
                                 calibration data: a sublayer that barely turns the residual
                                 stream (cos near 1) matters little. Every linear layer of a
                                 sublayer gets that sublayer's score.
    zscore_scores(gm)            data-free: share of a layer's weights beyond 3 standard
                                 deviations; more outliers = more important.
Higher score = more important. Both return {layer name: score} for every linear layer.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ..executors import Executor
from ..ir.linear import layer_name, linear_weight
from .calibration import calibrate


def linear_layers(gm: fx.GraphModule) -> dict[str, torch.Tensor]:
    """{layer name: weight [out, in]} for every linear layer with a constant weight."""
    out = {}
    for node in gm.graph.nodes:
        lw = linear_weight(gm, node)
        if lw is not None:
            out[layer_name(node)] = lw[0]
    return out


def zscore_scores(gm: fx.GraphModule, threshold: float = 3.0) -> dict[str, float]:
    scores = {}
    for name, w in linear_layers(gm).items():
        w = w.detach().float()
        z = (w - w.mean()) / w.std().clamp(min=1e-12)
        scores[name] = float((z.abs() > threshold).float().mean())
    return scores


def lim_scores(gm: fx.GraphModule, calibration: list[tuple], progress: bool = True,
               executor: Executor | None = None) -> dict[str, float]:
    stats = calibrate(gm, calibration, progress=progress, desc="layer importance", executor=executor)
    # sublayer = the module that holds the residual writer (e.g. layers.3.mlp for layers.3.mlp.down_proj)
    sublayers = {writer.rpartition(".")[0]: -r.cosine for writer, r in stats.residuals.items()}
    scores = {}
    for name in linear_layers(gm):
        owners = [s for s in sublayers if s and name.startswith(s + ".")]
        scores[name] = sublayers[max(owners, key=len)] if owners else float("inf")   # unknown: keep precise
    return scores
