"""Sequential FFN fusion (Bercovich et al., "FFN Fusion", 2025).

Rewrites a run of consecutive FFN sublayers (no attention between them, e.g. after layer
skipping removed it), found by graph pattern:
    X1 -> X2 = X1 + FFN_1(X1) -> ... -> Xn+1 = Xn + FFN_n(Xn)
into one wide FFN that reads X1 only:
    Xout = X1 + FFN_fused(X1),   FFN_fused(X) = sum_k FFN_k(X)
For SwiGLU (Llama/Qwen2/Mistral): gate = [g_1 * gamma_1; ...; g_n * gamma_n],
up = [u_1 * gamma_1; ...], down = [d_1 | ... | d_n], one RMSNorm with unit gain. For GPT-2
style LayerNorm + Linear-GELU-Linear: the gains fold into the first linear's columns and the
LayerNorm biases into its bias (W beta + b); output biases add up. The fused block equals the
parallel FFNs exactly (up to rounding); the approximation is the parallelization itself.

Runs are chosen by the dependency metric on calibration batches: M[i, j] = 1 - cos(FFN_j's
output with FFN_i present, without it), for i < j in a run of consecutive FFNs. Adjacent
groups merge greedily, lowest max M first, while max M <= `max_dependency` and the
perplexity on the calibration batches stays within `max_perplexity_increase` of the graph
before the pass. `runs=[[names]]` fuses exactly those. `mode="parallel"` only rewires
(every FFN of a run reads X1), which is what the fused form computes, op for op.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..analysis.quality import next_token_nll
from ..analysis.sublayers import SkipEvaluator, Sublayer, branch_nodes, find_sublayers, node_named
from ..errors import GraphoptError, PreconditionError
from ..ir import ops
from ..ir.graph import constant_value, describe, eliminate_dead_code, infer_meta, remove_unused_attributes
from ..ir.linear import linear_bias, linear_input, linear_weight, set_linear_weight, through_views
from ..ir.moe import MOE_OPS
from ..ir.traversal import ancestors, descendants
from .base import Pass, PassResult, Tolerance

aten = torch.ops.aten


def ffn_runs(sublayers: list[Sublayer]) -> list[list[Sublayer]]:
    """Maximal runs (length >= 2) of FFN sublayers with no attention sublayer between them."""
    runs, current = [], []
    for s in sublayers:
        if s.kind == "ffn":
            current.append(s)
        else:
            current = []
            continue
        if len(current) == 2:
            runs.append(current)
    return runs


@dataclass
class _FFN:
    """One FFN sublayer taken apart: its norm's gain, input linears, middle and output linear."""

    sub: Sublayer
    add: fx.Node
    stream: fx.Node
    writer: fx.Node
    branch: set
    norm: fx.Node                       # the node that applies the gain (mul or layer_norm)
    gain: torch.Tensor                  # [H]
    shift: torch.Tensor | None          # LayerNorm bias [H]
    inputs: list[fx.Node]               # input linears, graph order
    middle: list[fx.Node]               # between input linears and writer, graph order
    width: int                          # intermediate width F


def is_moe(gm: fx.GraphModule, sub: Sublayer) -> bool:
    return any(n.target in MOE_OPS for n in branch_nodes(gm, sub))


def _dissect(gm: fx.GraphModule, sub: Sublayer) -> _FFN:
    writer, stream, add = (node_named(gm, n) for n in (sub.writer, sub.stream, sub.add))
    branch = branch_nodes(gm, sub)
    if is_moe(gm, sub):
        raise GraphoptError(f"FFN {sub.name} is a mixture-of-experts block: FFN fusion concatenates dense FFNs' "
                            "weights and has no MoE form (its dependency metric still scores it)")
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    inputs = sorted((n for n in branch if n is not writer and linear_weight(gm, n) is not None), key=order.get)
    if not inputs:
        raise GraphoptError(f"FFN {sub.name}: no input linear layer before {describe(writer)}")
    sources = {linear_input(n) for n in inputs}
    if len(sources) != 1:
        raise GraphoptError(f"FFN {sub.name}: its input linears read different tensors")
    norm = through_views(next(iter(sources)))
    hidden = stream.meta["val"].shape[-1]
    shift = None
    if norm.target is aten.layer_norm.default:
        gain = constant_value(gm, norm.args[2]) if len(norm.args) > 2 else None
        shift = constant_value(gm, norm.args[3]) if len(norm.args) > 3 else None
        if gain is None:
            gain = torch.ones(hidden)
    elif norm.target is aten.mul.Tensor:
        gains = [constant_value(gm, a) for a in norm.args]
        gain = next((g for g in gains if g is not None and g.dim() == 1 and g.shape[0] == hidden), None)
        if gain is None:
            raise GraphoptError(f"FFN {sub.name}: {describe(norm)} is not a norm gain (constant [{hidden}])")
    else:
        raise GraphoptError(f"FFN {sub.name}: no RMSNorm gain or LayerNorm before its input linears "
                            f"(found {describe(norm)})")
    middle = sorted(descendants(inputs, within=branch) - set(inputs) - {writer}, key=order.get)
    width = linear_weight(gm, inputs[0])[0].shape[0]
    return _FFN(sub, add, stream, writer, branch, norm, gain, shift, inputs, middle, width)


def _signature(nodes: list[fx.Node], width: int) -> list:
    """Ops and their non-tensor arguments, with the intermediate width abstracted."""
    def arg(a):
        if isinstance(a, fx.Node):
            return "node"
        if isinstance(a, (list, tuple)):
            return tuple("F" if x == width else arg(x) for x in a)
        return a
    return [(n.target, tuple(arg(a) for a in n.args)) for n in nodes]


def _norm_signature(m: _FFN) -> list:
    order = {n: i for i, n in enumerate(m.norm.graph.nodes)}
    return _signature(sorted(ancestors([m.norm], within=m.branch), key=order.get), -1)


def _check_compatible(members: list[_FFN]) -> None:
    first = members[0]
    for m in members[1:]:
        problems = []
        if len(m.inputs) != len(first.inputs) or [x.target for x in m.inputs] != [x.target for x in first.inputs]:
            problems.append("different input linears")
        if m.norm.target is not first.norm.target or (m.shift is None) != (first.shift is None) \
                or _norm_signature(m) != _norm_signature(first):
            problems.append("different norms")
        if _signature(m.middle, m.width) != _signature(first.middle, first.width):
            problems.append("different activation subgraphs")
        if m.writer.target is not first.writer.target:
            problems.append("different output linears")
        if problems:
            raise GraphoptError(f"cannot fuse {first.sub.name} with {m.sub.name}: {', '.join(problems)}")


def parallelize(gm: fx.GraphModule, group: list[Sublayer]) -> list[tuple[fx.Node, fx.Node, fx.Node]]:
    """Make every FFN of `group` read the group's input stream; returns the edits for `undo`."""
    first_stream = node_named(gm, group[0].stream)
    edits = []
    for sub in group[1:]:
        stream = node_named(gm, sub.stream)
        for node in branch_nodes(gm, sub):
            if stream in node.all_input_nodes:
                node.replace_input_with(stream, first_stream)
                edits.append((node, stream, first_stream))
    gm.recompile()
    return edits


def undo(gm: fx.GraphModule, edits) -> None:
    for node, old, new in reversed(edits):
        node.replace_input_with(new, old)
    gm.recompile()


def fuse_group(gm: fx.GraphModule, group: list[Sublayer]) -> str:
    """Replace the FFNs of `group` (consecutive in the stream) by one wide FFN."""
    members = [_dissect(gm, s) for s in group]
    _check_compatible(members)
    first = members[0]
    transposed = linear_weight(gm, first.inputs[0])[1]
    for j, node in enumerate(first.inputs):
        weights, biases = [], []
        for m in members:
            w, _ = linear_weight(gm, m.inputs[j])
            b = constant_value(gm, linear_bias(m.inputs[j]))
            bias = b if b is not None else torch.zeros(w.shape[0], dtype=w.dtype)
            if m.shift is not None:
                bias = bias + w @ m.shift
            weights.append(w * m.gain[None, :].to(w.dtype))
            biases.append(bias)
        has_bias = any(constant_value(gm, linear_bias(m.inputs[j])) is not None for m in members) \
            or first.shift is not None
        set_linear_weight(gm, node, torch.cat(weights, 0), torch.cat(biases, 0) if has_bias else None, transposed,
                     f"{first.sub.name}_fused_in{j}")
    w_out = torch.cat([linear_weight(gm, m.writer)[0] for m in members], 1)
    out_biases = [constant_value(gm, linear_bias(m.writer)) for m in members]
    b_out = sum(b for b in out_biases if b is not None) if any(b is not None for b in out_biases) else None
    set_linear_weight(gm, first.writer, w_out, b_out, linear_weight(gm, first.writer)[1], f"{first.sub.name}_fused_out")
    _drop_gain(gm, first)
    total = first.width * len(members)
    for node in first.middle:
        if node.target in ops.VIEWS and isinstance(node.args[1], (list, tuple)) and node.args[1][-1] == first.width:
            node.args = (node.args[0], [*node.args[1][:-1], total], *node.args[2:])
    for m in members[1:]:
        stream_index = 0 if m.add.args[0] is not _writer_path(m) else 1
        m.add.replace_all_uses_with(m.add.args[stream_index])
        gm.graph.erase_node(m.add)
    eliminate_dead_code(gm)
    remove_unused_attributes(gm)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for node in sorted(first.inputs + first.middle + [first.writer], key=order.get):
        if node in order:
            infer_meta(gm, node)
    gm.recompile()
    return f"{' + '.join(m.sub.name for m in members)} -> one FFN of width {total}"


def _writer_path(m: _FFN) -> fx.Node:
    for a in m.add.args:
        if isinstance(a, fx.Node) and through_views(a) is m.writer:
            return a
    raise GraphoptError(f"{describe(m.add)} does not read {m.sub.name}'s output")


def _drop_gain(gm: fx.GraphModule, m: _FFN) -> None:
    if m.norm.target is aten.layer_norm.default:
        m.norm.args = (m.norm.args[0], m.norm.args[1], None, None, *m.norm.args[4:])
        return
    other = next(a for a in m.norm.args if constant_value(gm, a) is None)
    m.norm.replace_all_uses_with(other)
    gm.graph.erase_node(m.norm)


def dependency_matrix(evaluator: SkipEvaluator, run: list[Sublayer]) -> torch.Tensor:
    """M[i, j] (i < j, positions in `run`): mean over tokens of 1 - cos between FFN j's
    output with FFN i present and with it bypassed."""
    n = len(run)
    writers = [s.writer for s in run]
    base = evaluator.values(frozenset(), writers)
    matrix = torch.zeros(n, n)
    for i in range(n - 1):
        without = evaluator.values(frozenset({run[i].index}), writers[i + 1:])
        for j in range(i + 1, n):
            total, rows = 0.0, 0
            for b_env, w_env in zip(base, without):
                a, b = b_env[writers[j]], w_env[writers[j]]
                cos = F.cosine_similarity(
                    a.reshape(-1, a.shape[-1]).float(), b.reshape(-1, b.shape[-1]).float(), dim=-1
                )
                total += float((1 - cos).sum())
                rows += cos.numel()
            matrix[i, j] = total / rows
    return matrix


@dataclass
class FFNFusionOptions:
    runs: tuple[tuple[str, ...], ...] = ()          # exact groups of FFN sublayer names; else chosen
    max_dependency: float = 0.5                     # largest M[i, j] allowed inside a fused group
    max_perplexity_increase: float = 0.02           # on the calibration batches, vs before the pass
    max_group: int = 16                             # FFNs per fused group at most
    mode: str = "fused"                             # "fused" or "parallel" (rewire only)
    batches: int = 4
    max_output_change: float = math.inf


class FFNFusion(Pass):
    name = "ffn_fusion"
    Options = FFNFusionOptions

    def __init__(self, options=None, **overrides):
        super().__init__(options, **overrides)
        if self.options.mode not in ("fused", "parallel"):
            raise GraphoptError(f"FFNFusion mode must be 'fused' or 'parallel', got {self.options.mode!r}")
        self.tolerance = Tolerance(rtol=self.options.max_output_change)
        self.groups: list[list[str]] = []
        self.dependencies: dict[str, torch.Tensor] = {}

    def requires(self, gm, ctx):
        if not self.options.runs and not ctx.calibration:
            raise PreconditionError("FFN fusion chooses its runs on calibration batches "
                                    "(compile(..., calibration=[...])) or takes runs=[[names]]")

    def run(self, gm, ctx):
        sublayers = find_sublayers(gm)
        by_name = {s.name: s for s in sublayers}
        notes: list[str] = []
        if self.options.runs:
            groups = [[self._named(by_name, n) for n in run] for run in self.options.runs]
            for g in groups:
                self._check_consecutive(sublayers, g)
        else:
            groups = self._choose(gm, ctx, sublayers, notes)
        if not groups:
            return PassResult(gm, False, notes=notes or ["no runs of consecutive FFN sublayers"])
        self.groups = [[s.name for s in g] for g in groups]
        changes = []
        for g in groups:
            fresh = {s.name: s for s in find_sublayers(gm)}      # fusing renames the streams after it
            g = [fresh[s.name] for s in g]
            if self.options.mode == "parallel":
                parallelize(gm, g)
                changes.append(f"{' + '.join(s.name for s in g)} read one input (parallel)")
            else:
                changes.append(fuse_group(gm, g))
        return PassResult(gm, True, changes, notes)

    @staticmethod
    def _named(by_name, name):
        if name not in by_name:
            raise GraphoptError(f"no sublayer named {name!r}; found: {', '.join(by_name)}")
        if by_name[name].kind != "ffn":
            raise GraphoptError(f"{name} is an {by_name[name].kind} sublayer, not an FFN")
        return by_name[name]

    @staticmethod
    def _check_consecutive(sublayers, group):
        positions = [s.index for s in group]
        if positions != list(range(positions[0], positions[0] + len(group))):
            raise GraphoptError(f"{[s.name for s in group]} are not consecutive FFNs (attention between them)")

    def _choose(self, gm, ctx, sublayers, notes) -> list[list[Sublayer]]:
        runs = ffn_runs(sublayers)
        if not runs:
            return []
        o = self.options
        batches = ctx.calibration[: o.batches]
        evaluator = SkipEvaluator(gm, batches, sublayers)
        base_nll = evaluator.score(frozenset()).nll
        limit = base_nll + math.log1p(o.max_perplexity_increase)
        chosen: list[list[Sublayer]] = []
        for run in runs:
            matrix = dependency_matrix(evaluator, run)
            self.dependencies[run[0].name] = matrix
            if any(is_moe(gm, sub) for sub in run):
                notes.append(f"{' + '.join(sub.name for sub in run)}: mixture-of-experts FFNs, dependency measured "
                             f"(max M {float(matrix.max()):.3f}) but not fused (fusion has no MoE form)")
                continue
            groups = [[i] for i in range(len(run))]
            rejected: set[tuple[int, int]] = set()
            while True:
                merges = []
                for g in range(len(groups) - 1):
                    merged = groups[g] + groups[g + 1]
                    key = (merged[0], merged[-1])
                    if len(merged) > o.max_group or key in rejected:
                        continue
                    worst = float(matrix[merged[0]:merged[-1] + 1, merged[0]:merged[-1] + 1].max())
                    if worst <= o.max_dependency:
                        merges.append((worst, g))
                if not merges:
                    break
                worst, g = min(merges)
                merged = groups[g] + groups[g + 1]
                trial = [[run[i] for i in grp] for grp in groups[:g] + [merged] + groups[g + 2:] if len(grp) > 1]
                nll = self._nll_with(gm, evaluator, chosen + trial)
                if nll <= limit:
                    groups[g:g + 2] = [merged]
                else:
                    rejected.add((merged[0], merged[-1]))
                    notes.append(f"not fused {run[merged[0]].name}..{run[merged[-1]].name}: perplexity "
                                 f"{math.exp(nll):.3f} > {math.exp(limit):.3f} (max dependency {worst:.3f})")
            chosen += [[run[i] for i in grp] for grp in groups if len(grp) > 1]
        if chosen:
            nll = self._nll_with(gm, evaluator, chosen)
            notes.append(f"calibration perplexity {math.exp(base_nll):.3f} -> {math.exp(nll):.3f} with "
                         f"{len(chosen)} fused groups")
        return chosen

    @staticmethod
    def _nll_with(gm, evaluator: SkipEvaluator, groups: list[list[Sublayer]]) -> float:
        edits = [e for g in groups for e in parallelize(gm, g)]
        try:
            total, tokens = 0.0, 0
            with torch.no_grad():
                for batch in evaluator.batches:
                    out = gm(*batch)
                    logits = out[0] if isinstance(out, (tuple, list)) else out
                    nll, count = next_token_nll(logits, batch[0])
                    total, tokens = total + nll, tokens + count
            return total / tokens
        finally:
            undo(gm, edits)
