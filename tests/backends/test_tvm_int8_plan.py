"""The TVM int8 kernels' activation plan: SmoothQuant's per-channel smoothing and LLM.int8's
outlier channels from activation peaks (graphopt.backends.tvm.int8_plan)."""
import numpy as np
import pytest
import torch

from graphopt.backends.tvm.int8_plan import MAX_OUTLIERS, int8_plans
from graphopt.frontend.torch_export import capture


class TwoLayers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.first = torch.nn.Linear(32, 32)
        self.second = torch.nn.Linear(32, 16)

    def forward(self, x):
        return self.second(torch.relu(self.first(x)))


def test_smoothing_is_the_geometric_balance_of_activation_and_weight_peaks():
    model = TwoLayers().eval()
    x = torch.randn(1, 20, 32)
    x[..., 3] *= 100                          # one channel 100x the others: an outlier at ratio 8
    plans = int8_plans(capture(model, (x,)).graph_module, [(x,)])
    plan = plans["model.first.weight"]
    assert plan.outliers == (3,)
    peaks = x.abs().amax((0, 1)).clamp(min=0.1 * float(x.abs().amax((0, 1)).median()))
    want = (peaks ** 0.5 / model.first.weight.detach().abs().amax(0) ** 0.5).numpy()
    want[3] = 0
    np.testing.assert_allclose(plan.smoothing, want, rtol=1e-6)
    assert plan.x_smoothing[3] == 0 and np.allclose(plan.x_smoothing[:3] * plan.smoothing[:3], 1)
    assert plans["model.second.weight"].smoothing.shape == (32,)


def test_outliers_are_the_largest_peaks_and_at_most_eight():
    model = TwoLayers().eval()
    x = torch.randn(2, 8, 32) * 0.1
    for rank, channel in enumerate(range(10, 22)):      # 12 outliers, channel 21 the largest
        x[0, 0, channel] = 10.0 + rank
    plan = int8_plans(capture(model, (x,)).graph_module, [(x,)])["model.first.weight"]
    assert plan.outliers == tuple(range(21, 21 - MAX_OUTLIERS, -1))
    assert (plan.smoothing[list(plan.outliers)] == 0).all() and (np.delete(plan.smoothing, plan.outliers) > 0).all()


def test_a_silent_channel_cannot_get_a_tiny_smoothing():
    model = TwoLayers().eval()
    x = torch.randn(1, 16, 32)
    x[..., 7] = 0                             # never active on the data
    plan = int8_plans(capture(model, (x,)).graph_module, [(x,)])["model.first.weight"]
    floor = 0.1 * float(x.abs().amax((0, 1)).median())
    w_peak = float(model.first.weight.detach().abs().amax(0)[7])
    assert plan.smoothing[7] == pytest.approx(floor ** 0.5 / w_peak ** 0.5, rel=1e-6)
