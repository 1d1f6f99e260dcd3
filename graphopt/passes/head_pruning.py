"""Attention-head pruning: drop whole key/value groups from every attention.

Found by graph pattern, not module names: each `scaled_dot_product_attention` node, its
query/key/value projections (the linear layers its inputs come from, through views,
transposes, rotary embedding and the grouped-query repeat) and its output projection (the
linear layer its output reaches through views and transposes). A group is one key/value head
and the query heads that read it (query head h reads key/value head h // (q_heads / kv_heads),
as Hugging Face's repeat_kv lays them out); with multi-head attention a group is one head.

    q/k/v projections   W[rows of the kept heads], bias likewise
    output projection   W[:, columns of the kept query heads]
    shape literals      views / reshapes / expands between them follow the new head counts

Heads are independent until the output projection, so the result equals the model with the
output-projection columns of the dropped query heads zeroed (tested to 1e-5).

Importance of a group:
    "l2"         the L2 norm of its weights (q/k/v rows and output columns); data-free
    "ablation"   measured: the Jensen-Shannon divergence of the model's first output (read as
                 logits) when the group's output columns are zeroed, on calibration batches
                 (or the example inputs); each trial re-runs only the graph after that
                 output projection
    callable(q_rows, k_rows, v_rows, o_columns) -> float
Defaults: "ablation", "global". Scope "global" drops `ratio` of all groups in the model, the
least important first, so layers that need their heads keep them (with "l2", a group's
score is relative to its attention's mean; "ablation" scores compare across layers as they
are); "layer" drops `ratio` of the groups of every attention. Every attention keeps at least
`min_groups`.
"""
from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.fx as fx
from tqdm.auto import tqdm

from ..analysis.quality import js_divergence, log_probs
from ..analysis.sublayers import run_from
from ..errors import PreconditionError
from ..executors import Executor, LocalExecutor
from ..executors.graph import GraphWorkload
from ..ir import ops
from ..ir.graph import add_constant, constant_value, describe, infer_meta, module_path, remove_unused_attributes
from .base import Pass, PassResult, Tolerance, option

aten = torch.ops.aten
_LINEAR = (aten.linear.default,)
_LAYOUT = ops.LAYOUT
_SHAPED = ops.VIEWS | ops.EXPANDS   # shape = args[1]


@dataclass
class Attention:
    """One attention found in the graph, with its projections and head layout."""

    sdpa: fx.Node
    q: fx.Node
    k: fx.Node
    v: fx.Node
    o: fx.Node
    head_dim: int
    q_heads: int
    kv_heads: int

    @property
    def name(self) -> str:
        return module_path(self.o).rpartition(".")[0] or self.sdpa.name


def _projection_above(node: fx.Node, gm: fx.GraphModule, limit: int = 40) -> fx.Node | None:
    """The linear layer (constant weight) `node` is computed from, searching inputs depth-first."""
    stack, seen = [node], set()
    while stack and len(seen) < limit:
        current = stack.pop()
        if current in seen or not isinstance(current, fx.Node):
            continue
        seen.add(current)
        if (
            current.op == "call_function"
            and current.target in _LINEAR
            and constant_value(gm, current.args[1]) is not None
        ):
            return current
        if current.op == "call_function":
            stack.extend(reversed([a for a in current.args if isinstance(a, fx.Node)]))
    return None


def _projection_below(node: fx.Node, gm: fx.GraphModule) -> fx.Node | None:
    """The linear layer `node`'s value reaches through layout ops only."""
    current = node
    while len(current.users) == 1:
        (user,) = current.users
        if user.op == "call_function" and user.target in _LINEAR and user.args[0] is current \
                and constant_value(gm, user.args[1]) is not None:
            return user
        if user.op != "call_function" or user.target not in _LAYOUT:
            return None
        current = user
    return None


def find_attentions(gm: fx.GraphModule) -> list[Attention]:
    from ..ir.kv_attention import KV_ATTENTION
    cached = gm.graph.find_nodes(op="call_function", target=KV_ATTENTION)
    if cached:
        raise PreconditionError(f"attention_head_pruning: {describe(cached[0])} is a text-generation graph's cached "
                                "attention, which head pruning does not handle yet; prune heads in a forward-pass "
                                "graph (compile without task=)")
    found = []
    for sdpa in gm.graph.find_nodes(op="call_function", target=aten.scaled_dot_product_attention.default):
        q, k, v = (_projection_above(arg, gm) for arg in sdpa.args[:3])
        o = _projection_below(sdpa, gm)
        if None in (q, k, v, o) or len({q, k, v}) != 3:
            raise PreconditionError(f"attention_head_pruning: cannot find separate q/k/v and output projections "
                                    f"around {describe(sdpa)} (fused q/k/v, as GPT-2's c_attn, is not supported)")
        head_dim = int(sdpa.args[0].meta["val"].shape[-1])
        q_out, kv_out = int(q.meta["val"].shape[-1]), int(k.meta["val"].shape[-1])
        if q_out % head_dim or kv_out % head_dim or (q_out // head_dim) % (kv_out // head_dim):
            raise PreconditionError(f"attention_head_pruning: head layout of {describe(sdpa)} not understood "
                                    f"(q {q_out}, k/v {kv_out} features, head dim {head_dim})")
        found.append(Attention(sdpa, q, k, v, o, head_dim, q_out // head_dim, kv_out // head_dim))
    return found


@dataclass
class PrunedAttention:
    kept_groups: list[int]
    groups: int
    q_heads: int
    head_dim: int
    output_module: str        # the output projection's module path

    def dropped_query_columns(self) -> list[int]:
        """Input columns of the output projection that belonged to the dropped query heads."""
        width = self.q_heads // self.groups * self.head_dim
        return [g * width + i for g in range(self.groups) if g not in self.kept_groups for i in range(width)]


def l2_group_importance(q_rows, k_rows, v_rows, o_columns) -> float:
    return float(sum(float(t.float().pow(2).sum()) for t in (q_rows, k_rows, v_rows, o_columns)) ** 0.5)


def _group_slices(att: Attention, g: int) -> tuple[slice, slice]:
    """Group g's query-feature slice (q rows, output-projection columns) and key/value slice."""
    rep, hd = att.q_heads // att.kv_heads, att.head_dim
    return slice(g * rep * hd, (g + 1) * rep * hd), slice(g * hd, (g + 1) * hd)


def weight_group_scores(gm: fx.GraphModule, att: Attention, score: Callable) -> list[float]:
    weights = {name: constant_value(gm, node.args[1]).detach() for name, node in
               (("q", att.q), ("k", att.k), ("v", att.v), ("o", att.o))}
    scores = []
    for g in range(att.kv_heads):
        q_rows, kv_rows = _group_slices(att, g)
        scores.append(float(score(weights["q"][q_rows], weights["k"][kv_rows], weights["v"][kv_rows],
                                  weights["o"][:, q_rows])))
    return scores


def ablation_group_scores(gm: fx.GraphModule, attentions: list[Attention], batches: list[tuple],
                          progress: bool = True, executor: Executor | None = None) -> list[list[float]]:
    """Per attention, per key/value group: the mean Jensen-Shannon divergence (nats) of the
    first output, read as logits, when the group's output-projection columns are zeroed.
    The trials run on `executor` (default: this process)."""
    trials = [(a, g) for a, att in enumerate(attentions) for g in range(att.kv_heads)]
    candidates = [(attentions[a].o.name, attentions[a].o.args[0].name, _group_slices(attentions[a], g)[0])
                  for a, g in trials]
    scores = [[0.0] * att.kv_heads for att in attentions]
    with tqdm(total=len(trials), desc="head ablation", unit="group", disable=not progress, leave=False) as bar, \
            (executor or LocalExecutor()).session(AblationWorkload(gm, batches)) as session:
        for (a, g), score in zip(trials, session.map(candidates, bar)):
            scores[a][g] = score
    return scores


class AblationWorkload(GraphWorkload):
    """Head-group ablation trials on an executor's workers: each worker runs the unmodified
    graph once per batch and keeps every value; a candidate (output projection node, its input
    node, columns) re-runs the graph from that projection with the columns zeroed."""

    def __init__(self, gm: fx.GraphModule, batches: list[tuple]):
        super().__init__(gm, batches[0])
        self.batches = list(batches)

    def setup(self):
        gm = self.graph()
        nodes = list(gm.graph.nodes)
        result = next(n for n in reversed(nodes) if n.op == "output").args[0]
        first = result[0] if isinstance(result, (tuple, list)) else result
        with torch.no_grad():
            bases = [run_from(gm, nodes, batch, {}, 0) for batch in self.batches]
        references = [log_probs(env[first]) for env in bases]
        return gm, nodes, {n: i for i, n in enumerate(nodes)}, {n.name: n for n in nodes}, first, bases, references

    def evaluate(self, state, candidate) -> float:
        gm, nodes, position, by_name, first, bases, references = state
        projection, heads_in, columns = by_name[candidate[0]], by_name[candidate[1]], candidate[2]
        start = position[projection]
        total = 0.0
        with torch.no_grad():
            for batch, env, ref in zip(self.batches, bases, references):
                prefix = {n: v for n, v in env.items() if position[n] < start}
                ablated = prefix[heads_in].clone()
                ablated[..., columns] = 0
                prefix[heads_in] = ablated
                out = run_from(gm, nodes, batch, prefix, start)
                total += js_divergence(ref, log_probs(out[first])) * ref.shape[0]
        return total / sum(r.shape[0] for r in references)


@dataclass
class AttentionHeadPruningOptions:
    ratio: float = option(0.25, "share of key/value head groups dropped (overall, or per attention)",
                          at_least=0.0, below=1.0)
    importance: str | Callable = option("ablation", "ablation: measured output divergence per group on calibration "
                                                    "text; l2: weight norms; or callable(q_rows, k_rows, v_rows, "
                                                    "o_columns)", choices=("ablation", "l2"), or_callable=True)
    scope: str = option("global", "global: the share of all groups, least important first; layer: of every "
                                  "attention", choices=("global", "layer"))
    ablation_batches: int = option(4, "calibration batches the ablation trials run on (the first ones)", at_least=1)
    exclude: tuple[str, ...] = option((), "attention module paths (fnmatch) left whole")
    min_groups: int = option(1, "groups every attention keeps", at_least=1)
    progress: bool = option(True, "a progress bar over the ablation trials")


class AttentionHeadPruning(Pass):
    """Drop the least important key/value groups of every attention; see the module docstring."""

    name = "attention_head_pruning"
    Options = AttentionHeadPruningOptions
    tolerance = Tolerance(rtol=float("inf"))     # lossy; its cost is measured by the quality instrument

    def __init__(self, options=None, **overrides):
        super().__init__(options, **overrides)
        self.pruned: dict[str, PrunedAttention] = {}     # attention name -> what was kept
        self.scores: dict[str, list[float]] = {}         # attention name -> importance per group

    def run(self, gm, ctx):
        o = self.options
        attentions = [att for att in find_attentions(gm)
                      if not any(fnmatch.fnmatch(att.name, pattern) for pattern in o.exclude)]
        if not attentions or o.ratio == 0:
            return PassResult(gm, False, [])
        scores = self._scores(gm, ctx, attentions)
        self.scores = {att.name: s for att, s in zip(attentions, scores)}
        kept = self._choose(attentions, scores)
        old_shapes = {n: tuple(n.meta["val"].shape) for n in gm.graph.nodes
                      if isinstance(n.meta.get("val"), torch.Tensor)}
        changes = []
        for att, groups in zip(attentions, kept):
            if len(groups) == att.kv_heads:
                continue
            rows = [_group_slices(att, g) for g in groups]
            q_index = [i for q, _ in rows for i in range(q.start, q.stop)]
            kv_index = [i for _, kv in rows for i in range(kv.start, kv.stop)]
            for node, index in ((att.q, q_index), (att.k, kv_index), (att.v, kv_index)):
                _select(gm, node, 1, 0, index)
                if len(node.args) > 2 and node.args[2] is not None:
                    _select(gm, node, 2, 0, index)
            _select(gm, att.o, 1, 1, q_index)
            rep = att.q_heads // att.kv_heads
            self.pruned[att.name] = PrunedAttention(groups, att.kv_heads, att.q_heads, att.head_dim,
                                                    module_path(att.o))
            changes.append(f"{att.name}: kept key/value groups {groups} of {att.kv_heads} "
                           f"({len(groups) * rep} of {att.q_heads} query heads)")
        if changes:
            _follow_head_counts(gm, old_shapes)
            remove_unused_attributes(gm)
        return PassResult(gm, bool(changes), changes)

    def _scores(self, gm, ctx, attentions: list[Attention]) -> list[list[float]]:
        o = self.options
        if o.importance == "ablation":
            batches = ctx.calibration or ([ctx.example_inputs] if ctx.example_inputs is not None else None)
            if not batches:
                raise PreconditionError("attention_head_pruning with importance='ablation' needs calibration "
                                        "batches or example inputs")
            batches = [tuple(b) for b in batches][:o.ablation_batches]
            return ablation_group_scores(gm, attentions, batches, progress=o.progress, executor=ctx.executor)
        score = l2_group_importance if o.importance == "l2" else o.importance
        return [weight_group_scores(gm, att, score) for att in attentions]

    def _choose(self, attentions: list[Attention], scores: list[list[float]]) -> list[list[int]]:
        """The kept groups of each attention (sorted)."""
        o = self.options
        if o.scope == "layer":
            counts = [max(o.min_groups, att.kv_heads - int(round(att.kv_heads * o.ratio))) for att in attentions]
            return [sorted(sorted(range(len(s)), key=lambda g: -s[g])[:min(n, len(s))])
                    for s, n in zip(scores, counts)]
        relative = o.importance != "ablation"        # weight norms differ in scale from layer to layer
        pool = []
        for a, s in enumerate(scores):
            mean = sum(s) / len(s) if relative and sum(s) else 1.0
            pool += [(v / mean, a, g) for g, v in enumerate(s)]
        budget = int(round(o.ratio * len(pool)))
        dropped: list[set[int]] = [set() for _ in attentions]
        for _, a, g in sorted(pool):
            if budget <= 0:
                break
            if attentions[a].kv_heads - len(dropped[a]) > o.min_groups:
                dropped[a].add(g)
                budget -= 1
        return [[g for g in range(att.kv_heads) if g not in d] for att, d in zip(attentions, dropped)]


def _select(gm: fx.GraphModule, node: fx.Node, arg: int, dim: int, index: list[int]) -> None:
    value = constant_value(gm, node.args[arg]).index_select(dim, torch.tensor(index, dtype=torch.long))
    old = node.args[arg]
    with gm.graph.inserting_before(node):
        node.update_arg(arg, gm.graph.get_attr(add_constant(gm, f"{old.target}_heads", value)))
    if not old.users:
        gm.graph.erase_node(old)


def _follow_head_counts(gm: fx.GraphModule, old_shapes: dict) -> None:
    """Re-infer every node's shape in order; literal shapes of views/expands whose input
    changed are re-derived from the new input shape first."""
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        source = node.args[0] if node.args else None
        if node.target in _SHAPED and isinstance(source, fx.Node) and source in old_shapes:
            new_in = tuple(source.meta["val"].shape)
            old_in = old_shapes[source]
            literal = list(node.args[1])
            if new_in != old_in and all(isinstance(d, int) for d in literal):
                if node.target == aten.expand.default:
                    shape = _expand_shape(old_in, new_in, literal)
                else:
                    shape = _reshape_shape(old_in, new_in, literal)
                node.update_arg(1, shape)
        infer_meta(gm, node)


def _expand_shape(old_in, new_in, literal):
    offset = len(literal) - len(old_in)
    out = list(literal)
    for i, (old, new) in enumerate(zip(old_in, new_in)):
        if old != 1 and literal[offset + i] == old:
            out[offset + i] = new
    return out


def _reshape_shape(old_in, new_in, literal):
    """Map a reshape of `old_in` to `literal` onto `new_in`: dims are grouped where products
    match; a group whose size changed scales its first non-unit output dim."""
    old_out = list(literal)
    if -1 in old_out:
        known = math.prod(d for d in old_out if d != -1)
        old_out[old_out.index(-1)] = math.prod(old_in) // known
    out, i, j = list(literal), 0, 0
    while i < len(old_in) or j < len(old_out):
        gi, gj = [i] if i < len(old_in) else [], [j] if j < len(old_out) else []
        pi = old_in[i] if i < len(old_in) else 1
        pj = old_out[j] if j < len(old_out) else 1
        i, j = i + 1, j + 1
        while pi != pj:
            if pi < pj:
                gi.append(i)
                pi *= old_in[i]
                i += 1
            else:
                gj.append(j)
                pj *= old_out[j]
                j += 1
        new_size = math.prod(new_in[d] for d in gi)
        if new_size != pi and gj:
            target = next((d for d in gj if old_out[d] != 1), gj[0])
            rest = math.prod(old_out[d] for d in gj if d != target)
            if literal[target] != -1:
                out[target] = new_size // rest
    return out
