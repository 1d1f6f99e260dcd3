"""Static int8 activation + weight quantization (W8A8, QDQ) with calibration observers.

Rewrites, for every linear layer except embeddings/heads and layers the user excludes:
    linear(x, W, b)  ->  linear(dq(q(x * keep)), dq(Wq), b) + x[..., C] @ W[:, C].T
where q/dq are int8 quantize/dequantize with a static per-tensor scale from calibration
(observer "minmax" or "percentile"), Wq is int8 per output channel, and C are the outlier
input channels (LLM.int8-style: calibration peak >= outlier_ratio x the median channel's,
which includes the super activations), kept in full precision and out of the scale.
A layer with more than `max_outlier_channels` such channels stays fp32.
ONNX Runtime fuses the QDQ pattern into MatMulIntegerToFloat (int8 GEMM).
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers quantized_decomposed ops)

from ..analysis.calibration import calibrate, outlier_channels
from ..errors import PreconditionError
from ..ir.graph import add_constant, eliminate_dead_code, infer_meta, remove_unused_attributes
from ..ir.linear import layer_name, linear_bias, linear_input, linear_weight
from .base import Pass, PassResult, Tolerance
from .weight_quantization import head_layers

aten = torch.ops.aten
qd = torch.ops.quantized_decomposed


@dataclass
class ActivationQuantizationOptions:
    observer: str = "percentile"        # "minmax" | "percentile"
    percentile: float = 99.99
    outlier_ratio: float = 8.0          # input channels whose peak >= this x median peak stay fp32
    max_outlier_channels: int = 32      # more than this: the whole layer stays fp32
    samples_per_batch: int = 65536
    exclude: tuple = ()                 # fnmatch patterns of layers kept in fp32
    max_output_change: float = 0.6


class ActivationQuantization(Pass):
    name = "activation_quantization"
    Options = ActivationQuantizationOptions

    def __init__(self, options=None, **overrides):
        super().__init__(options, **overrides)
        self.tolerance = Tolerance(rtol=self.options.max_output_change)

    def requires(self, gm, ctx):
        if not ctx.calibration:
            raise PreconditionError(
                f"{self.name}: needs calibration batches (graphopt.compile(..., calibration=[...]))"
            )
        if self.options.observer not in ("minmax", "percentile"):
            raise PreconditionError(f"{self.name}: observer must be 'minmax' or 'percentile'")

    def run(self, gm, ctx):
        o = self.options
        stats = {s.node: s for s in calibrate(gm, ctx.calibration, samples=o.samples_per_batch,
                                               desc="calibrate (activations)", executor=ctx.executor).linears.values()}
        heads = head_layers(gm)
        changes, kept = [], []
        for node in list(gm.graph.nodes):
            lw = linear_weight(gm, node)
            if lw is None or node in heads or node.name not in stats:
                continue
            name = layer_name(node)
            if any(fnmatch.fnmatchcase(name, p) for p in o.exclude):
                kept.append(f"{name} (excluded)")
                continue
            s = stats[node.name]
            peaks = s.input_absmax
            outliers = outlier_channels(peaks, o.outlier_ratio)
            if outliers.numel() > o.max_outlier_channels:
                kept.append(f"{name} ({outliers.numel()} outlier channels)")
                continue
            samples = torch.cat(s.abs_samples, 1)
            inliers = samples[0][~torch.isin(samples[1].long(), outliers)]
            if o.observer == "minmax" or inliers.numel() == 0:
                keep_peaks = peaks.clone()
                keep_peaks[outliers] = 0
                bound = float(keep_peaks.max())
            else:
                bound = float(torch.quantile(inliers[:16_000_000].double(), o.percentile / 100))
            scale = max(bound, 1e-8) / 127
            self._rewrite(gm, node, lw[0], scale, outliers)
            changes.append(f"{name}: int8 activations (scale {scale:.3g}) x int8 weights"
                           + (f", {outliers.numel()} outlier channel(s) in fp32: {outliers.tolist()[:6]}"
                              if outliers.numel() else ""))
        if changes:
            eliminate_dead_code(gm)
            remove_unused_attributes(gm)
        notes = [f"kept in fp32: {', '.join(kept[:12])}" + (" ..." if len(kept) > 12 else "")] if kept else []
        return PassResult(gm, bool(changes), changes, notes)

    def _rewrite(self, gm, node, weight, scale, outliers):
        graph = gm.graph
        w = weight.detach().float()
        w_scale = (w.abs().amax(1) / 127).clamp(min=1e-12)
        w_int8 = torch.round(w / w_scale[:, None]).clamp(-127, 127).to(torch.int8)
        base = layer_name(node)
        x, bias = linear_input(node), linear_bias(node)
        new = []
        with graph.inserting_before(node):
            wq = graph.get_attr(add_constant(gm, f"{base}_w_int8", w_int8))
            ws = graph.get_attr(add_constant(gm, f"{base}_w_scale", w_scale))
            wz = graph.get_attr(add_constant(gm, f"{base}_w_zero", torch.zeros_like(w_scale, dtype=torch.int64)))
            xin = x
            if outliers.numel():
                keep = torch.ones(w.shape[1], dtype=w.dtype)
                keep[outliers] = 0
                mask = graph.get_attr(add_constant(gm, f"{base}_inlier_mask", keep))
                xin = graph.call_function(aten.mul.Tensor, (x, mask))
                new.append(xin)
            xq = graph.call_function(qd.quantize_per_tensor.default, (xin, scale, 0, -128, 127, torch.int8))
            xd = graph.call_function(qd.dequantize_per_tensor.default, (xq, scale, 0, -128, 127, torch.int8))
            wd = graph.call_function(qd.dequantize_per_channel.default, (wq, ws, wz, 0, -127, 127, torch.int8))
            out = graph.call_function(aten.linear.default, (xd, wd, bias) if bias is not None else (xd, wd))
            new += [xq, xd, wd, out]
            if outliers.numel():
                cols = graph.get_attr(add_constant(gm, f"{base}_outlier_cols", outliers.clone()))
                w_out = graph.get_attr(add_constant(gm, f"{base}_outlier_w", w[:, outliers].t().contiguous()))
                picked = graph.call_function(aten.index_select.default, (x, -1, cols))
                extra = graph.call_function(aten.matmul.default, (picked, w_out))
                out = graph.call_function(aten.add.Tensor, (out, extra))
                new += [picked, extra, out]
        for n in new:
            n.meta.update({k: node.meta[k] for k in ("nn_module_stack", "stack_trace") if k in node.meta})
            infer_meta(gm, n)
        node.replace_all_uses_with(out)
        graph.erase_node(node)
