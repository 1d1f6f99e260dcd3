"""Weight-only quantization: linear/matmul weights and embedding tables to int4/int8 blocks.

Rewrites (weights found by graph pattern: any linear, matmul or mm whose weight is a
constant 2-D float matrix, any embedding with a constant table):
    linear(x, W, b)       ->  add(matmul_nbits(x, Wq), b)
    matmul(x, W), mm(x, W) -> matmul_nbits(x, quantize(W.T))
    addmm(b, x, W)        ->  add(matmul_nbits(x, quantize(W.T)), b)     (GPT-2's Conv1D)
    embedding(W, ids)     ->  embedding_nbits(ids, Wq)      (shares Wq with a tied LM head)
    moe_experts(x, ..., gate_up, down) -> moe_experts_nbits(x, ..., each expert's matrices
                             quantized round-to-nearest; the router linears stay fp32)
    with super weights restored:
    linear(x, W)          ->  matmul_nbits(x, Wq) + index_select(x, -1, cols) @ E
where E [S, N] holds, for each of the S restored weights, W[row, col] - Wq[row, col] at row.

Round-to-nearest in row-aligned blocks (graphopt.ir.quantized), optional outlier clipping
("mse" range search per block, weighted by the calibration inputs' E[x^2] when calibration
batches are given; "zscore" clamping), or GPTQ (error compensation from calibration
inputs); optional restore of super weights
(graphopt.analysis.super_weights, found from the example inputs). Per-layer bits and
group sizes (mixed precision) come from `layer_overrides`: {fnmatch pattern: (bits, group)}.
ONNX Runtime runs MatMulNBits with int8 activations (accuracy_level 4) except in layers
whose calibration inputs carry super activations (channel peak >= activation_outlier_ratio x
the median channel's), which compute in fp32, so the outliers stay out of the int8 scales.
Lossy: the verify instrument holds the outputs to `max_output_change` x max|logit|.
"""
from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from ..analysis.calibration import calibrate
from ..analysis.super_weights import DEFAULT_SPIKE_RATIO, find_super_weights
from ..errors import PreconditionError
from ..ir.graph import (
    add_constant,
    constant_value,
    eliminate_dead_code,
    infer_meta,
    remove_unused_attributes,
    storage_identity,
)
from ..ir.lazy import resolve
from ..ir.linear import layer_name, linear_bias, linear_input, linear_weight
from ..ir.moe import MOE_EXPERTS, MOE_EXPERTS_NBITS, router_linears, stack_quantized
from ..ir.quantized import (
    EMBEDDING_NBITS,
    MATMUL_NBITS,
    QuantizedWeight,
    fitting_block_size,
    gptq_quantize,
    quantize_weight,
)
from .base import Pass, PassResult, Tolerance

aten = torch.ops.aten


@dataclass
class WeightQuantizationOptions:
    bits: int = 4
    group_size: int | None = 64        # None: one scale per output channel
    method: str = "rtn"                 # "rtn" | "gptq" (needs calibration batches) | "auto" (gptq
                                        # when calibration batches are given, else rtn)
    clip: str = "none"                  # "none" | "mse" | "zscore" (see quantize_weight); gptq: none | mse
    zscore: float = 4.0
    restore_super_weights: bool = False
    spike_ratio: float = DEFAULT_SPIKE_RATIO
    embeddings: bool = True             # quantize embedding tables too
    head_bits: int | None = 8           # embeddings, tied heads and output heads: per-channel at these
                                        # bits (None: same scheme as the other layers)
    head_group_size: int | None = None  # their blocks (None: one scale per output channel)
    grid: str = "minmax"                # "minmax" | "offset" | "symmetric" (graphopt.ir.quantized), rtn only
    head_grid: str = "minmax"
    scale_dtype: str = "float32"        # "float16" stores scales (and minimums) in half the bytes
    layer_overrides: dict = field(default_factory=dict)   # {pattern: (bits, group_size) or None=fp32}
    exclude: tuple = ()                 # fnmatch patterns of layers kept in fp32
    accuracy_level: int = 4             # ONNX Runtime MatMulNBits: 4 = int8 activations in the kernel
                                        # (fast on VNNI), 0 = fp32 compute
    activation_outlier_ratio: float = 100.0  # layers whose input has a channel peak >= this x the
                                        # median channel peak (super activations) compute in fp32
    max_output_change: float | None = None   # verify budget (x max|output|); default by bits


class WeightQuantization(Pass):
    name = "weight_quantization"
    Options = WeightQuantizationOptions

    def __init__(self, options=None, **overrides):
        super().__init__(options, **overrides)
        o = self.options
        budget = o.max_output_change if o.max_output_change is not None else (0.1 if o.bits == 8 else 0.6)
        self.tolerance = Tolerance(rtol=budget)
        self.needs_example_inputs = o.restore_super_weights

    def requires(self, gm, ctx):
        if self.options.method not in ("rtn", "gptq", "auto"):
            raise PreconditionError(f"{self.name}: method must be 'rtn', 'gptq' or 'auto', got {self.options.method!r}")
        if self.options.method == "gptq" and not ctx.calibration:
            raise PreconditionError(f"{self.name}: method='gptq' needs calibration batches "
                                    "(graphopt.compile(..., calibration=[...]))")
        if self.options.method == "gptq" and self.options.grid != "minmax":
            raise PreconditionError(
                f"{self.name}: method='gptq' uses the 'minmax' grid, got grid={self.options.grid!r}"
            )
        if self.options.scale_dtype not in ("float32", "float16"):
            raise PreconditionError(f"{self.name}: scale_dtype must be 'float32' or 'float16', "
                                    f"got {self.options.scale_dtype!r}")
        bits = {self.options.bits} | {v[0] for v in self.options.layer_overrides.values() if v}
        if not bits <= {4, 8}:
            raise PreconditionError(f"{self.name}: bits must be 4 or 8, got {sorted(bits)}")

    def scheme(self, layer: str) -> tuple[int, int | None] | None:
        """(bits, group_size) for a layer, or None to keep it in fp32."""
        if any(fnmatch.fnmatchcase(layer, p) for p in self.options.exclude):
            return None
        for pattern, value in self.options.layer_overrides.items():
            if fnmatch.fnmatchcase(layer, pattern):
                return tuple(value) if value else None
        return self.options.bits, self.options.group_size

    def run(self, gm, ctx):
        o = self.options
        restore = {}
        notes = []
        if o.method == "auto":
            o = dataclasses.replace(o, method="gptq" if ctx.calibration else "rtn")
            given = "calibration batches given" if ctx.calibration else "no calibration batches"
            notes.append(f"method auto -> {o.method} ({given})")
        example_stats = None
        if o.restore_super_weights or (o.accuracy_level != 0 and not ctx.calibration and ctx.example_inputs):
            example_stats = calibrate(gm, [tuple(ctx.example_inputs)], progress=False)
        if o.restore_super_weights:
            report = find_super_weights(gm, ctx.example_inputs, o.spike_ratio, stats=example_stats)
            for sw in report.super_weights:
                restore.setdefault(sw.node, []).append(sw)
            notes += [f"super weight kept in fp32: {sw}" for sw in report.super_weights] or \
                     ["no super weights found at spike ratio %g" % o.spike_ratio]
        observed = example_stats
        if ctx.calibration and (o.method == "gptq" or o.clip == "mse" or o.accuracy_level != 0):
            observed = calibrate(gm, ctx.calibration, hessians=o.method == "gptq", desc="calibrate (weights)",
                                 executor=ctx.executor)
        stats = {s.node: s for s in observed.linears.values()} if observed else None
        fp32_compute = {name for name, s in (stats or {}).items() if o.accuracy_level != 0 and
                        float(s.input_absmax.max()) >= o.activation_outlier_ratio *
                        max(float(s.input_absmax.median()), 1e-12)}
        cache: dict[tuple, tuple[QuantizedWeight, tuple[str, str, str]]] = {}
        changes, skipped = [], []
        counts = {"linear": 0, "embedding": 0}
        bytes_before = bytes_after = 0
        heads = head_layers(gm)
        routers = router_linears(gm)
        counts["experts"] = 0
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node in routers:
                continue
            if node.target is MOE_EXPERTS:
                done = self._replace_experts(gm, node, o)
                if done is None:
                    skipped.append(layer_name(node))
                    continue
                change, before, after = done
                changes.append(change)
                counts["experts"] += 1
                bytes_before, bytes_after = bytes_before + before, bytes_after + after
                continue
            is_embedding = node.target is aten.embedding.default and o.embeddings
            lw = None if is_embedding else linear_weight(gm, node)
            if lw is None and not is_embedding:
                continue
            layer = layer_name(node)
            scheme = self.scheme(layer)
            grid = o.grid
            if scheme is not None and node in heads and o.head_bits is not None:
                scheme, grid = (o.head_bits, o.head_group_size), o.head_grid
            if scheme is None:
                skipped.append(layer)
                continue
            bits, group = scheme
            if is_embedding:
                table = constant_value(gm, node.args[0])
                if table is None or table.dim() != 2 or not table.is_floating_point():
                    continue
                weight, transposed = table, False
            else:
                weight, transposed = lw
            sws = restore.get(node.name, []) if not is_embedding else []
            key = (storage_identity(weight), transposed, bits, group, grid, tuple((s.row, s.col) for s in sws))
            if key not in cache:
                w = resolve(gm, weight).detach().float()
                if sws:
                    w = w.clone()
                    for s in sws:
                        w[s.row, s.col] = 0.0
                observed = stats.get(node.name) if stats and not is_embedding else None
                if o.method == "gptq" and observed is not None and node not in heads:
                    q = gptq_quantize(w, observed.hessian, bits, group, clip=o.clip)
                else:
                    if group and grid != "minmax" and w.shape[1] % group:   # fixed grids need whole blocks
                        group = fitting_block_size(w.shape[1], group)
                    q = quantize_weight(w, bits, group, o.clip if grid == "minmax" else "none", o.zscore,
                                        channel_weights=observed.input_mean_sq if observed is not None else None,
                                        grid=grid, scale_dtype=getattr(torch, o.scale_dtype))
                parts = ("packed", "scales", "zero_points") + (("minimums",) if q.minimums is not None else ())
                names = tuple(add_constant(gm, f"{layer}_{part}_q{bits}", getattr(q, part)) for part in parts)
                cache[key] = (q, names)
                bytes_before += weight.numel() * weight.element_size()
                del w
                bytes_after += q.nbytes
            q, names = cache[key]
            if is_embedding:
                self._replace_embedding(gm, node, q, names)
                counts["embedding"] += 1
            else:
                self._replace_linear(gm, node, q, names, weight, sws,
                                     0 if node.name in fp32_compute else o.accuracy_level)
                counts["linear"] += 1
            changes.append(f"{layer}: {'embedding' if is_embedding else 'linear'} "
                           f"[{q.n}x{q.k}] -> int{bits} {'per-channel' if group is None else f'g{group}'}"
                           + (f" {grid} grid" if grid != "minmax" else "")
                           + (f", {len(sws)} super weight(s) restored" if sws else "")
                           + (", fp32 compute (activation outliers)" if node.name in fp32_compute else ""))
        if changes:
            eliminate_dead_code(gm)
            remove_unused_attributes(gm)
            experts = f", {counts['experts']} MoE expert sets" if counts["experts"] else ""
            changes.insert(0, f"{counts['linear']} linear and {counts['embedding']} embedding weights{experts} "
                              f"quantized; {bytes_before / 1e6:.1f} MB fp32 -> {bytes_after / 1e6:.1f} MB")
        if routers:
            notes.append(f"MoE routers kept in fp32: {', '.join(sorted(layer_name(r) for r in routers))}")
        if counts["experts"] and o.method == "gptq":
            notes.append("MoE experts: round-to-nearest (GPTQ's per-expert calibration inputs are not collected)")
        if skipped:
            notes.append(f"kept in fp32 by exclude/overrides: {', '.join(skipped[:10])}"
                         + (" ..." if len(skipped) > 10 else ""))
        return PassResult(gm, bool(changes), changes, notes)

    def _replace_experts(self, gm, node, o) -> tuple[str, int, int] | None:
        """moe_experts -> moe_experts_nbits, every expert's matrices round-to-nearest on the
        layer's scheme; None if the scheme keeps the layer in fp32."""
        layer = layer_name(node)
        scheme = self.scheme(layer)
        if scheme is None:
            return None
        bits, group = scheme
        hidden, index, weights, gate_up, down, activation = node.args
        stacked = [constant_value(gm, gate_up), constant_value(gm, down)]
        if any(value is None for value in stacked):
            return None
        parts, blocks, before, after = [], [], 0, 0
        clip = o.clip if o.grid == "minmax" else "none"
        for which, value in zip(("gate_up", "down"), stacked):
            k = value.shape[2]
            block = fitting_block_size(k, group) if group and o.grid != "minmax" and k % group else group
            quantized = [quantize_weight(value[e].detach().float(), bits, block, clip, o.zscore, grid=o.grid,
                                         scale_dtype=getattr(torch, o.scale_dtype))
                         for e in range(value.shape[0])]
            with gm.graph.inserting_before(node):
                parts.append([gm.graph.get_attr(add_constant(gm, f"{layer}_{which}_{part}_q{bits}", tensor))
                              for part, tensor in zip(("packed", "scales", "zero_points", "minimums"),
                                                      stack_quantized(quantized))])
            blocks.append(quantized[0].block_size)
            before += value.numel() * value.element_size()
            after += sum(q.nbytes for q in quantized)
        with gm.graph.inserting_before(node):
            out = gm.graph.call_function(MOE_EXPERTS_NBITS, (hidden, index, weights, parts[0], parts[1], bits,
                                                             *blocks, activation, o.accuracy_level))
        self._finish(gm, node, [out], out)
        experts = stacked[0].shape[0]
        grid = f" {o.grid} grid" if o.grid != "minmax" else ""
        groups = "per-channel" if group is None else "/".join(f"g{b}" for b in dict.fromkeys(blocks))
        return (f"{layer}: {experts} experts [{stacked[0].shape[1]}x{stacked[0].shape[2]}, "
                f"{stacked[1].shape[1]}x{stacked[1].shape[2]}] -> int{bits} {groups}{grid}", before, after)

    def _getattrs(self, gm, names):
        return [gm.graph.get_attr(n) for n in names]

    def _replace_linear(self, gm, node, q: QuantizedWeight, names, weight, super_weights, accuracy_level):
        graph = gm.graph
        x, bias = linear_input(node), linear_bias(node)
        with graph.inserting_before(node):
            packed, scales, zps, *minimums = self._getattrs(gm, names)
            new_nodes = []
            if q.scales.dtype != torch.float32:
                scales = graph.call_function(aten._to_copy.default, (scales,), {"dtype": torch.float32})
                new_nodes.append(scales)
            out = graph.call_function(MATMUL_NBITS, (x, packed, scales, zps, q.bits, q.block_size, q.k,
                                                     accuracy_level))
            new_nodes.append(out)
            if minimums:
                out = self._add_block_offsets(graph, x, out, scales, minimums[0], q, new_nodes)
            if super_weights:
                dequantized = q.dequantize()
                cols = torch.tensor([s.col for s in super_weights], dtype=torch.long)
                correction = torch.zeros(len(super_weights), q.n, dtype=weight.dtype)
                for i, s in enumerate(super_weights):
                    correction[i, s.row] = float(weight[s.row, s.col].detach()) - float(dequantized[s.row, s.col])
                base = layer_name(node)
                cols_node = graph.get_attr(add_constant(gm, f"{base}_super_cols", cols))
                corr_node = graph.get_attr(add_constant(gm, f"{base}_super_delta", correction))
                picked = graph.call_function(aten.index_select.default, (x, -1, cols_node))
                delta = graph.call_function(aten.matmul.default, (picked, corr_node))
                out = graph.call_function(aten.add.Tensor, (out, delta))
                new_nodes += [picked, delta, out]
            if bias is not None:
                out = graph.call_function(aten.add.Tensor, (out, bias))
                new_nodes.append(out)
        self._finish(gm, node, new_nodes, out)

    @staticmethod
    def _add_block_offsets(graph, x, out, scales, minimums, q: QuantizedWeight, new_nodes):
        """out + blocksum(x) @ (minimum + 2**(bits-1) * scale).T: the "offset" grid's float
        minimum per block, which MatMulNBits (integer zero points) cannot hold."""
        n_blocks = q.k // q.block_size
        call = graph.call_function
        mins = call(aten._to_copy.default, (minimums,), {"dtype": torch.float32})
        scaled = call(aten.mul.Tensor, (call(aten.view.default, (scales, [q.n, n_blocks])), float(1 << (q.bits - 1))))
        offsets = call(aten.t.default, (call(aten.add.Tensor, (mins, scaled)),))
        sums = call(aten.sum.dim_IntList, (call(aten.unflatten.int, (x, -1, [n_blocks, q.block_size])), [-1]))
        result = call(aten.add.Tensor, (out, call(aten.matmul.default, (sums, offsets))))
        new_nodes += [mins, scaled.args[0], scaled, offsets.args[0], offsets, sums.args[0], sums,
                      result.args[1], result]
        return result

    def _replace_embedding(self, gm, node, q: QuantizedWeight, names):
        graph = gm.graph
        with graph.inserting_before(node):
            packed, scales, zps = self._getattrs(gm, names)
            out = graph.call_function(EMBEDDING_NBITS, (node.args[1], packed, scales, zps, q.bits, q.block_size, q.k))
        self._finish(gm, node, [out], out)

    @staticmethod
    def _finish(gm: fx.GraphModule, old: fx.Node, new_nodes: list[fx.Node], out: fx.Node) -> None:
        for n in new_nodes:
            n.meta.update({k: old.meta[k] for k in ("nn_module_stack", "stack_trace") if k in old.meta})
            infer_meta(gm, n)
        old.replace_all_uses_with(out)
        gm.graph.erase_node(old)


def head_layers(gm: fx.GraphModule) -> set[fx.Node]:
    """Embeddings, linears that share an embedding's table (tied LM heads), and linears whose
    result is a graph output: the layers quantization hurts most (one wrong logit row per token)."""
    tables = {storage_identity(constant_value(gm, n.args[0])) for n in gm.graph.find_nodes(
        op="call_function", target=aten.embedding.default) if constant_value(gm, n.args[0]) is not None}
    outputs = {a for n in gm.graph.find_nodes(op="output") for a in n.all_input_nodes}
    heads = set()
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is aten.embedding.default:
            heads.add(node)
            continue
        lw = linear_weight(gm, node)
        if lw is not None and (storage_identity(lw[0]) in tables or node in outputs):
            heads.add(node)
    return heads
