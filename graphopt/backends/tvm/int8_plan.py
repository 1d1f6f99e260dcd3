"""What the TVM int8 kernels do to each weight matmul's activations before rounding them, learnt
from the activations on the example inputs and calibration batches:

- smoothing (SmoothQuant): input channel c of x is divided by s_c = peak|x_c|^alpha /
  peak|W_c|^(1 - alpha) and the weight's row c multiplied by it, so that a channel with large
  activations no longer sets the scale of every other channel of its row;
- outlier channels (LLM.int8): the channels with the largest peaks (at least `ratio` x the
  median channel's, at most `max_outliers` of them) leave the int8 product and are multiplied
  in fp32 by their own weights.

Peaks of channels that were (nearly) silent on the data are raised to a tenth of the median
peak, so that a channel the data never woke cannot get a tiny s and a huge x / s later.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.fx as fx

from ...analysis.calibration import calibrate, outlier_channels
from ...ir.linear import linear_weight, through_views

ALPHA = 0.5
OUTLIER_RATIO = 8.0
MAX_OUTLIERS = 8
CALIBRATION_BATCHES = 4        # of compile()'s calibration, besides the example inputs


@dataclass
class Int8Plan:
    smoothing: np.ndarray         # [k] float32 s: the weight's row c times s_c, x_c / s_c rounded; 0 at outliers
    outliers: tuple[int, ...]     # input channels multiplied in fp32, largest peak first

    @property
    def x_smoothing(self) -> np.ndarray:
        """What the kernel multiplies x by before rounding: 1 / s, 0 at the outlier channels."""
        return np.divide(1.0, self.smoothing, out=np.zeros_like(self.smoothing), where=self.smoothing > 0)


def int8_plans(gm: fx.GraphModule, batches: list[tuple], alpha: float = ALPHA, ratio: float = OUTLIER_RATIO,
               max_outliers: int = MAX_OUTLIERS) -> dict[str, Int8Plan]:
    """Weight attribute name (a get_attr target of `gm`) -> its plan, for every linear layer
    whose weight is one; a weight two layers read gets the peaks of both inputs."""
    stats = calibrate(gm, batches, progress=False)
    nodes = {node.name: node for node in gm.graph.nodes}
    peaks: dict[str, torch.Tensor] = {}
    weights: dict[str, torch.Tensor] = {}
    for linear in stats.linears.values():
        node = nodes[linear.node]
        found = linear_weight(gm, node)
        attribute = through_views(node.args[2] if node.target is torch.ops.aten.addmm.default else node.args[1])
        if found is None or attribute.op != "get_attr":
            continue
        name = attribute.target
        peaks[name] = torch.maximum(peaks[name], linear.input_absmax) if name in peaks else linear.input_absmax
        weights[name] = found[0]
    return {name: _plan(peaks[name].float(), weights[name].detach().float(), alpha, ratio, max_outliers)
            for name in peaks}


def _plan(peaks: torch.Tensor, weight: torch.Tensor, alpha: float, ratio: float, max_outliers: int) -> Int8Plan:
    outliers = outlier_channels(peaks, ratio)[:max_outliers]
    x_peaks = peaks.clamp(min=max(0.1 * float(peaks.median()), 1e-5))
    w_peaks = weight.abs().amax(0).clamp(min=1e-5)
    smoothing = x_peaks ** alpha / w_peaks ** (1 - alpha)
    smoothing[outliers] = 0
    return Int8Plan(smoothing.numpy().astype(np.float32), tuple(int(c) for c in outliers))
