"""Calibration runner: runs the IR on calibration batches and collects per-node statistics.

Read-only. For every linear layer (aten.linear / matmul / mm with a constant 2-D weight) it
records per-input-channel max |x| and mean x^2, per-output-channel max |y|, and where the
largest |y| occurred (token, channel) with the input channel that peaked at that token:
what super-weight detection and activation quantization need. For every residual add
(an add whose operands have the same shape and one of them is written by a linear layer)
it records the mean cosine between the residual stream before and after it: what layer
skipping and layer importance need.

    stats = calibrate(gm, batches)          # batches: list of input tuples
    stats.linears["layers.3.mlp.down_proj"].input_absmax
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import torch
import torch.fx as fx
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..executors import Executor, LocalExecutor
from ..executors.graph import GraphWorkload
from ..ir.lazy import LazyInterpreter
from ..ir.linear import layer_name, linear_input, linear_weight, through_views
from ..ir.moe import MOE_OPS
from ..ir.traversal import reaches

aten = torch.ops.aten


def same_shape_add(add: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """The two operands of `add` if it is an aten add of two graph values of one shape."""
    if add.op != "call_function" or add.target is not aten.add.Tensor or len(add.args) != 2:
        return None
    a, b = add.args
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
        return None
    va, vb = a.meta.get("val"), b.meta.get("val")
    if not (isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor)) or va.shape != vb.shape:
        return None
    return a, b


def branch_output(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A node that can end a residual branch: a linear layer, a mixture-of-experts op, or the
    sum of an MoE op and a linear (shared experts, as in DeepSeek-V3)."""
    if linear_weight(gm, node) is not None or node.target in MOE_OPS:
        return True
    if node.op == "call_function" and node.target is torch.ops.aten.add.Tensor and len(node.args) == 2 \
            and all(isinstance(a, fx.Node) for a in node.args):
        parts = [through_views(a) for a in node.args]
        return any(p.target in MOE_OPS for p in parts) and all(branch_output(gm, p) for p in parts)
    return False


def residual_writer(gm: fx.GraphModule, add: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """(residual input, sublayer output) if `add` is a residual add, else None.

    The sublayer output is the operand produced by a linear layer or an MoE block (possibly
    through views; see branch_output); the other operand is the stream, which must not itself
    be such an output nor computed from this one (GELU's x + 0.044715 x^3 is not a residual
    add: both sides come from one linear)."""
    operands = same_shape_add(add)
    if operands is None:
        return None
    a, b = operands
    for stream, sub in ((a, b), (b, a)):
        writer = through_views(sub)
        if branch_output(gm, writer) and not branch_output(gm, through_views(stream)) \
                and not reaches(stream, writer, limit=64):
            return stream, writer
    return None


@dataclass
class LinearStats:
    name: str
    node: str
    in_features: int
    out_features: int
    input_absmax: torch.Tensor = None          # [K]
    input_sq_sum: torch.Tensor = None          # [K]
    output_absmax: torch.Tensor = None         # [N]
    tokens: int = 0
    peak: float = 0.0                          # largest |y| seen
    peak_token: int = -1                       # flat token index (within its batch) of the peak
    peak_batch: int = -1
    peak_channel: int = -1                     # output channel of the peak
    peak_input_channel: int = -1               # argmax |x| at the peak token
    peak_input_value: float = 0.0
    hessian: torch.Tensor | None = None        # [K, K] sum of x^T x (shared by layers that read one input)
    abs_samples: list = field(default_factory=list)   # per batch [2, S]: random |x| samples and their channels

    @property
    def input_mean_sq(self) -> torch.Tensor:
        return self.input_sq_sum / max(self.tokens, 1)

    def update(self, x: torch.Tensor, y: torch.Tensor, batch: int) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        y = y.detach().reshape(-1, y.shape[-1]).float()
        ax, ay = x.abs(), y.abs()
        in_max, out_max = ax.amax(0), ay.amax(0)
        if self.input_absmax is None:
            self.input_absmax, self.input_sq_sum, self.output_absmax = in_max, (x * x).sum(0), out_max
        else:
            self.input_absmax = torch.maximum(self.input_absmax, in_max)
            self.input_sq_sum += (x * x).sum(0)
            self.output_absmax = torch.maximum(self.output_absmax, out_max)
        self.tokens += x.shape[0]
        flat = int(ay.argmax())
        token, channel = divmod(flat, ay.shape[1])
        if float(ay[token, channel]) > self.peak:
            self.peak, self.peak_token, self.peak_batch, self.peak_channel = (
                float(ay[token, channel]),
                token,
                batch,
                channel,
            )
            self.peak_input_channel = int(ax[token].argmax())
            self.peak_input_value = float(x[token, self.peak_input_channel])


@dataclass
class ResidualStats:
    name: str                     # layer name of the sublayer's output linear
    node: str                     # the add node
    cos_sum: float = 0.0
    tokens: int = 0

    @property
    def cosine(self) -> float:
        return self.cos_sum / max(self.tokens, 1)


@dataclass
class CalibrationStats:
    linears: dict[str, LinearStats] = field(default_factory=dict)       # by layer name
    residuals: dict[str, ResidualStats] = field(default_factory=dict)   # by layer name of the writer
    batches: int = 0


class _Observer(LazyInterpreter):
    def __init__(self, gm, linear_nodes: dict, residual_nodes: dict, hessians: bool, samples: int = 0):
        super().__init__(gm)
        self.samples = samples
        self.generator = torch.Generator().manual_seed(0)
        self.linear_nodes, self.residual_nodes = linear_nodes, residual_nodes
        self.hessians: dict[fx.Node, torch.Tensor] | None = {} if hessians else None
        self.batch = 0
        self.hessian_done: set = set()

    def run_node(self, n):
        out = super().run_node(n)
        if n in self.linear_nodes:
            x = self.env[linear_input(n)]
            record = self.linear_nodes[n]
            record.update(x, out, self.batch)
            if self.samples:
                flat = x.detach().reshape(-1).abs().float()
                pick = torch.randint(0, flat.numel(), (min(self.samples, flat.numel()),), generator=self.generator)
                record.abs_samples.append(torch.stack([flat[pick], (pick % x.shape[-1]).float()]))
            if self.hessians is not None:
                self._accumulate_hessian(linear_input(n), x, record)
        elif n in self.residual_nodes:
            stream_node, record = self.residual_nodes[n]
            before = self.env[stream_node].detach().reshape(-1, out.shape[-1]).float()
            after = out.detach().reshape(-1, out.shape[-1]).float()
            record.cos_sum += float(F.cosine_similarity(before, after, dim=-1).sum())
            record.tokens += before.shape[0]
        return out


    def _accumulate_hessian(self, source: fx.Node, x: torch.Tensor, record: LinearStats) -> None:
        flat = x.detach().reshape(-1, x.shape[-1]).float()
        if source not in self.hessians:
            self.hessians[source] = torch.zeros(flat.shape[1], flat.shape[1])
        if (source, self.batch) not in self.hessian_done:       # once per input, not per reader
            self.hessians[source].addmm_(flat.t(), flat)
            self.hessian_done.add((source, self.batch))
        record.hessian = self.hessians[source]


def outlier_channels(peaks: torch.Tensor, ratio: float) -> torch.Tensor:
    """Input channels whose calibration peak |x| is at least `ratio` x the median channel's
    (LLM.int8's outlier features; they include the super activations), largest first."""
    found = torch.nonzero(peaks >= ratio * peaks.median().clamp(min=1e-12)).flatten()
    return found[torch.argsort(peaks[found], descending=True, stable=True)]


def calibrate(gm: fx.GraphModule, batches: Iterable[tuple], progress: bool = True,
              desc: str = "calibrate", hessians: bool = False, samples: int = 0,
              executor: Executor | None = None) -> CalibrationStats:
    """Run `gm` on each batch (a tuple of inputs) and collect the statistics above;
    `hessians=True` also sums x^T x of every linear layer's input (for GPTQ); `samples` keeps
    that many random |x| values per batch and layer (for percentile observers). On an
    `executor` with several workers each takes a contiguous share of the batches and the
    shares' statistics are merged in batch order."""
    batches = list(batches)
    executor = executor or LocalExecutor()
    shares = min(executor.workers, len(batches)) or 1
    bounds = [(len(batches) * i // shares, len(batches) * (i + 1) // shares) for i in range(shares)]
    workload = CalibrationWorkload(gm, batches, hessians, samples, progress and shares == 1, desc)
    with executor.session(workload) as session, \
            tqdm(total=len(bounds), desc=f"{desc} ({executor.describe()})", unit="share",
                 disable=not progress or shares == 1, leave=False) as bar:
        return merge_stats(session.map(bounds, bar))


def observe(gm: fx.GraphModule, batches: list[tuple], first: int = 0, progress: bool = False,
            desc: str = "calibrate", hessians: bool = False, samples: int = 0) -> CalibrationStats:
    """The statistics of `batches`, numbered from `first` (peaks and samples name their batch)."""
    stats = CalibrationStats()
    linear_nodes, residual_nodes = {}, {}
    for node in gm.graph.nodes:
        lw = linear_weight(gm, node)
        if lw is not None:
            name = layer_name(node)
            if name in stats.linears:          # one module called twice: keep names unique
                name = f"{name}#{node.name}"
            stats.linears[name] = linear_nodes[node] = LinearStats(name, node.name, lw[0].shape[1], lw[0].shape[0])
        rw = residual_writer(gm, node)
        if rw is not None:
            stream, sub = rw
            name = layer_name(sub)
            stats.residuals[name] = ResidualStats(name, node.name)
            residual_nodes[node] = (stream, stats.residuals[name])
    observer = _Observer(gm, linear_nodes, residual_nodes, hessians, samples)
    with torch.no_grad():
        for i, batch in enumerate(tqdm(batches, desc=desc, unit="batch", disable=not progress, leave=False)):
            observer.batch = first + i
            observer.generator.manual_seed(first + i)      # the same samples however batches are shared out
            observer.run(*batch)
    stats.batches = len(batches)
    return stats


def merge_stats(shares: list[CalibrationStats]) -> CalibrationStats:
    """One CalibrationStats from those of consecutive shares of the batches (in order)."""
    merged = shares[0]
    for share in shares[1:]:
        summed: dict[int, torch.Tensor] = {}      # a Hessian shared by layers reading one input: added once
        for name, other in share.linears.items():
            record = merged.linears[name]
            record.input_absmax = torch.maximum(record.input_absmax, other.input_absmax)
            record.input_sq_sum = record.input_sq_sum + other.input_sq_sum
            record.output_absmax = torch.maximum(record.output_absmax, other.output_absmax)
            record.tokens += other.tokens
            if other.peak > record.peak:
                for field_name in ("peak", "peak_token", "peak_batch", "peak_channel", "peak_input_channel",
                                   "peak_input_value"):
                    setattr(record, field_name, getattr(other, field_name))
            if other.hessian is not None:
                if id(other.hessian) not in summed:
                    summed[id(other.hessian)] = record.hessian.add_(other.hessian)
                record.hessian = summed[id(other.hessian)]
            record.abs_samples.extend(other.abs_samples)
        for name, other in share.residuals.items():
            merged.residuals[name].cos_sum += other.cos_sum
            merged.residuals[name].tokens += other.tokens
        merged.batches += share.batches
    return merged


class CalibrationWorkload(GraphWorkload):
    """Calibration on an executor's workers: a candidate is a range of batch numbers."""

    def __init__(self, gm: fx.GraphModule, batches: list[tuple], hessians: bool, samples: int,
                 progress: bool = False, desc: str = "calibrate"):
        super().__init__(gm, batches[0] if batches else ())
        self.batches, self.hessians, self.samples = batches, hessians, samples
        self.progress, self.desc = progress, desc

    def setup(self) -> fx.GraphModule:
        return self.graph()

    def evaluate(self, gm: fx.GraphModule, bounds: tuple[int, int]) -> CalibrationStats:
        start, end = bounds
        return observe(gm, self.batches[start:end], start, self.progress, self.desc, self.hessians, self.samples)
