"""Super activations and super weights (Yu et al., 2024), data-free: one forward pass.

A super activation is a hidden-state value orders of magnitude above its layer's typical
output; it is written into the residual stream by a sublayer's output projection (the
FFN's down projection in the paper). The super weight is that projection's weight at
[row = output channel of the spike, col = input channel that peaked at the spike's token].

    report = find_super_weights(gm, example_inputs)
    for sw in report.super_weights: print(sw)

The candidates are those residual writers whose peak |output| is at least `spike_ratio`
times the median over channels of their per-channel peak. Whether a candidate matters is
proved by ablation (zero it, measure perplexity): `graphopt superweights --ablate`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.fx as fx
from tqdm.auto import tqdm

from ..executors import Executor, LocalExecutor
from ..executors.graph import GraphWorkload
from ..ir.linear import layer_name, linear_weight
from .calibration import CalibrationStats, calibrate, residual_writer

DEFAULT_SPIKE_RATIO = 50.0


@dataclass
class SuperWeight:
    layer: str            # layer (module path) of the linear that holds it
    node: str             # its node in the graph
    row: int              # output channel = hidden channel of the super activation
    col: int              # input channel that peaked at the spike's token
    weight: float         # W[row, col]
    weight_zscore: float  # (W[row, col] - mean(W)) / std(W): how much of an outlier it is
    activation: float     # the output spike |y[token, row]|
    input_value: float    # x[token, col]
    token: int
    spike_ratio: float    # activation / median over channels of per-channel peak |y|

    def __str__(self) -> str:
        return (f"{self.layer}[{self.row}, {self.col}] = {self.weight:+.4f} (z {self.weight_zscore:+.1f}); "
                f"output spike {self.activation:.1f} at token {self.token} ({self.spike_ratio:.0f}x median), "
                f"input {self.input_value:+.1f}")

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class SuperWeightReport:
    super_weights: list[SuperWeight] = field(default_factory=list)
    super_activation_channels: list[int] = field(default_factory=list)   # hidden channels that spike
    spike_ratio: float = DEFAULT_SPIKE_RATIO

    def to_json(self) -> dict:
        return {"spike_ratio": self.spike_ratio, "super_activation_channels": self.super_activation_channels,
                "super_weights": [sw.to_json() for sw in self.super_weights]}


def find_super_weights(gm: fx.GraphModule, example_inputs: tuple, spike_ratio: float = DEFAULT_SPIKE_RATIO,
                       progress: bool = False, stats: CalibrationStats | None = None) -> SuperWeightReport:
    """`stats`: calibration statistics of `gm` on `example_inputs` if the caller has them."""
    stats = stats or calibrate(gm, [tuple(example_inputs)], progress=progress, desc="super weights")
    writers = {layer_name(rw[1]) for node in gm.graph.nodes if (rw := residual_writer(gm, node))}
    nodes = {n.name: n for n in gm.graph.nodes}
    report = SuperWeightReport(spike_ratio=spike_ratio)
    for name, s in stats.linears.items():
        if name not in writers or s.output_absmax is None:
            continue
        typical = float(s.output_absmax.median())
        ratio = s.peak / typical if typical > 0 else float("inf")
        if ratio < spike_ratio:
            continue
        w, _ = linear_weight(gm, nodes[s.node])
        w = w.detach().float()
        value = float(w[s.peak_channel, s.peak_input_channel])
        z = (value - float(w.mean())) / max(float(w.std()), 1e-12)
        report.super_weights.append(SuperWeight(name, s.node, s.peak_channel, s.peak_input_channel, value, z,
                                                s.peak, s.peak_input_value, s.peak_token, ratio))
        if s.peak_channel not in report.super_activation_channels:
            report.super_activation_channels.append(s.peak_channel)
    return report


def ablate(gm: fx.GraphModule, super_weight: SuperWeight):
    """A context manager that zeroes one super weight in place and restores it on exit."""
    return _Zeroed(gm, super_weight)


class _Zeroed:
    def __init__(self, gm, sw: SuperWeight):
        node = next(n for n in gm.graph.nodes if n.name == sw.node)
        w, _ = linear_weight(gm, node)
        self.weight, self.index = w, (sw.row, sw.col)
        self.saved = None

    def __enter__(self):
        with torch.no_grad():
            self.saved = self.weight[self.index].clone()
            self.weight[self.index] = 0.0

    def __exit__(self, *exc):
        with torch.no_grad():
            self.weight[self.index] = self.saved


def ablation_perplexities(gm: fx.GraphModule, windows: list[torch.Tensor], super_weights: list[SuperWeight],
                          executor: Executor | None = None, progress: bool = True) -> list[float]:
    """Perplexity on `windows` with everything kept, then with each super weight zeroed (one at
    a time), evaluated on `executor` (default: this process)."""
    candidates = [None, *super_weights]
    with (executor or LocalExecutor()).session(SuperWeightWorkload(gm, windows)) as session, \
            tqdm(total=len(candidates), desc="super-weight ablation", unit="run", disable=not progress,
                 leave=False) as bar:
        return session.map(candidates, bar)


class SuperWeightWorkload(GraphWorkload):
    """A candidate: a super weight to zero (None: none); the result: perplexity on the windows."""

    def __init__(self, gm: fx.GraphModule, windows: list[torch.Tensor]):
        super().__init__(gm, (windows[0],))
        self.windows = windows

    def setup(self) -> fx.GraphModule:
        return self.graph()

    def evaluate(self, gm: fx.GraphModule, candidate: SuperWeight | None) -> float:
        from .quality import perplexity
        if candidate is None:
            return perplexity(gm, self.windows, progress=False).perplexity
        with ablate(gm, candidate):
            return perplexity(gm, self.windows, progress=False).perplexity
