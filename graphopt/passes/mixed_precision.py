"""Mixed-precision weight quantization by layer importance (Layer-wise mixed precision, 2024).

Rewrites: as WeightQuantization, with bits chosen per layer:
    every linear layer -> `low` scheme (int4 in the largest group <= 256 that divides its
    input width), then the most important layers
    are raised to `high` (e.g. int8 per channel) while the packed bytes stay within the
    budget (by default: what int4 g64 would take for the same layers).
Importance: "lim" (calibration data: -cos of the residual stream across the layer's
sublayer) or "zscore" (data-free share of outlier weights); see graphopt.analysis.importance.
Embeddings and LM heads keep WeightQuantization's `head_bits`.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..analysis.importance import lim_scores, linear_layers, zscore_scores
from ..errors import PreconditionError
from ..ir.linear import layer_name
from ..ir.quantized import fitting_block_size, quantized_bytes
from .weight_quantization import WeightQuantization, WeightQuantizationOptions, head_layers


@dataclass
class MixedPrecisionOptions(WeightQuantizationOptions):
    low: tuple = (4, 256)               # (bits, largest group) of the least important layers; each
                                        # layer takes the largest power of two <= it that divides K
    high: tuple = (8, None)             # (bits, group_size) of the most important layers
    budget_scheme: tuple = (4, 64)      # spend no more bytes than this scheme on every layer
    importance: str = "lim"             # "lim" (needs calibration) | "zscore" (data-free)


class MixedPrecisionQuantization(WeightQuantization):
    name = "mixed_precision_quantization"
    Options = MixedPrecisionOptions

    def __init__(self, options=None, **overrides):
        super().__init__(options, **overrides)
        self.plan: dict[str, tuple] = {}

    def requires(self, gm, ctx):
        super().requires(gm, ctx)
        if self.options.importance not in ("lim", "zscore"):
            raise PreconditionError(f"{self.name}: importance must be 'lim' or 'zscore'")
        if self.options.importance == "lim" and not ctx.calibration:
            raise PreconditionError(f"{self.name}: importance='lim' needs calibration batches")

    def scheme(self, layer):
        base = super().scheme(layer)
        return self.plan.get(layer, base) if base is not None else None

    def run(self, gm, ctx):
        o = self.options
        heads = {layer_name(n) for n in head_layers(gm)} if o.head_bits is not None else set()
        layers = {name: w for name, w in linear_layers(gm).items()
                  if name not in heads and WeightQuantization.scheme(self, name) is not None}
        scores = lim_scores(gm, ctx.calibration, executor=ctx.executor) if o.importance == "lim" else zscore_scores(gm)
        budget = sum(quantized_bytes(*w.shape, *o.budget_scheme) for w in layers.values())
        low_bits, low_group = o.low
        self.plan = {name: (low_bits, fitting_block_size(w.shape[1], low_group)) for name, w in layers.items()}
        spent = sum(quantized_bytes(*w.shape, *self.plan[name]) for name, w in layers.items())
        for name in sorted(layers, key=lambda n: -scores.get(n, 0.0)):
            extra = quantized_bytes(*layers[name].shape, *o.high) - quantized_bytes(
                *layers[name].shape, *self.plan[name]
            )
            if spent + extra <= budget:
                self.plan[name] = tuple(o.high)
                spent += extra
        result = super().run(gm, ctx)
        raised = [n for n, s in self.plan.items() if s == tuple(o.high)]
        result.notes.insert(
            0,
            f"{len(raised)} of {len(layers)} layers at {o.high}, the rest int{low_bits} in groups <= {low_group}; "
            f"{spent / 1e6:.2f} MB of a {budget / 1e6:.2f} MB budget ({o.budget_scheme}); "
            f"raised: {', '.join(raised[:12])}" + (" ..." if len(raised) > 12 else ""),
        )
        return result
