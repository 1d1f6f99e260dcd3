"""Sublayers of a residual network, found by graph pattern, and fast what-if evaluation of
removing them.

A sublayer is a residual add `stream + f(stream)` whose `f` ends in a linear layer or a
mixture-of-experts block (see `calibration.residual_writer`). It is an attention sublayer
when `f` mixes tokens (scaled_dot_product_attention, softmax, or a matmul of two
activations) and an FFN otherwise; an MoE block is always an FFN. An attention sublayer
followed by an FFN sublayer is a block. This holds for Llama/Qwen2/Mistral (RMSNorm, SwiGLU),
GPT-2 (LayerNorm, Conv1D as addmm, GELU) and MoE models (Mixtral, Qwen3-MoE, DeepSeek-V3)
alike; module names are only used to label what was found.

In a convolutional network, a residual add `stream + f(stream)` whose `f` ends in a
convolution (or its batch norm) and whose stream is not itself a convolution's output (an
identity shortcut, as in ResNet's basic and bottleneck blocks) is a sublayer of kind
"block": a whole residual block. Blocks with a projection shortcut change the stream's
shape or scale and are not removable.

Removing a sublayer makes its add pass the stream through; dead-code elimination then
drops its nodes and weights.

`SkipEvaluator` runs the graph with any set of sublayers bypassed, re-running only the part
of the graph after the first changed sublayer (the values before it are kept from a base
run): what greedy searches over removal sets (FinerCut) need.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..errors import GraphoptError
from ..executors.graph import GraphWorkload
from ..ir import ops
from ..ir.graph import constant_value, eliminate_dead_code, remove_unused_attributes
from ..ir.kv_attention import KV_ATTENTION
from ..ir.linear import layer_name, linear_weight, through_views
from ..ir.moe import MOE_OPS
from ..ir.traversal import ancestors, reaches
from .calibration import residual_writer, same_shape_add
from .quality import js_divergence, log_probs, next_token_nll

aten = torch.ops.aten
_TOKEN_MIXERS = ops.ATTENTIONS | {aten._softmax.default, aten.softmax.int, KV_ATTENTION}
_PAIRWISE = ops.LINEARS | ops.BATCHED_MATMULS


def run_from(gm: fx.GraphModule, nodes: list[fx.Node], batch: tuple, env: dict, start: int,
             alias: dict[fx.Node, fx.Node] | None = None) -> dict:
    """Run `nodes[start:]` of `gm` (up to the output) on `batch`, on top of `env`: the values
    of the nodes before `start`, kept from an earlier run (possibly altered). A node in
    `alias` takes the value of its alias instead of being computed. Returns every value."""
    alias = alias or {}
    inputs = iter(batch)
    env = dict(env)
    interp = fx.Interpreter(gm, garbage_collect_values=False)
    for node in nodes[start:]:
        if node.op == "output":
            break
        if node.op == "placeholder":
            env[node] = next(inputs)
        elif node in alias:
            env[node] = env[alias[node]]
        else:
            interp.env = env
            env[node] = interp.run_node(node)
    return env


@dataclass(frozen=True)
class Sublayer:
    """One residual branch. `index` is its position along the residual stream."""

    index: int
    kind: str            # "attention", "ffn", or "block" (a convolutional residual block)
    name: str            # e.g. "layers.3.self_attn", "h.3.mlp", "blocks.1" (module of its output layer's module)
    block: int           # blocks pair an attention sublayer with the FFN after it
    add: str             # node names in the graph
    stream: str
    writer: str

    @property
    def label(self) -> str:
        return f"{self.kind}[{self.block}]"


def _branch_nodes(writer: fx.Node, stream: fx.Node) -> set[fx.Node]:
    """The nodes computing the branch: ancestors of `writer` up to the stream."""
    return ancestors([writer], stop=lambda n: n is stream or n.op in ("placeholder", "get_attr"))


def _mixes_tokens(gm: fx.GraphModule, nodes: set[fx.Node]) -> bool:
    if any(node.target in MOE_OPS for node in nodes):
        return False              # an MoE block is an FFN (its router's softmax mixes experts, not tokens)
    for node in nodes:
        if node.op != "call_function":
            continue
        if node.target in _TOKEN_MIXERS:
            return True
        if node.target in _PAIRWISE and linear_weight(gm, node) is None:
            return True
    return False


def _module_of(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else name


def _convolution_of(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    """The convolution with a constant weight whose output `node` is, directly or through
    its batch norm; None otherwise."""
    if node.op == "call_function" and node.target is operator.getitem and node.args[1] == 0:
        norm = node.args[0]
        if isinstance(norm, fx.Node) and norm.op == "call_function" and norm.target in ops.BATCH_NORMS:
            node = through_views(norm.args[0])
    elif node.op == "call_function" and node.target is aten.batch_norm.default:
        node = through_views(node.args[0])
    if node.op == "call_function" and node.target in ops.CONVOLUTIONS \
            and constant_value(gm, node.args[1]) is not None:
        return node
    return None


def conv_residual(gm: fx.GraphModule, add: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node] | None:
    """(stream, branch output, its convolution) if `add` adds an identity shortcut to a branch
    ending in a convolution (or its batch norm), else None."""
    operands = same_shape_add(add)
    if operands is None or add.kwargs:
        return None
    a, b = operands
    for stream, branch in ((a, b), (b, a)):
        conv = _convolution_of(gm, through_views(branch))
        if conv is not None and _convolution_of(gm, through_views(stream)) is None \
                and not reaches(stream, conv, limit=64):
            return stream, branch, conv
    return None


def find_sublayers(gm: fx.GraphModule) -> list[Sublayer]:
    """Every residual sublayer of `gm`, in stream order."""
    found, block, seen_attention = [], -1, False
    for node in gm.graph.nodes:
        rw = residual_writer(gm, node)
        if rw is None:
            conv = conv_residual(gm, node)
            if conv is not None:
                block += 1
                stream, branch, convolution = conv
                found.append(Sublayer(len(found), "block", _module_of(layer_name(convolution)), block,
                                      node.name, stream.name, branch.name))
            continue
        stream, writer = rw
        kind = "attention" if _mixes_tokens(gm, _branch_nodes(writer, stream)) else "ffn"
        if kind == "attention" or not seen_attention:
            block += 1
        seen_attention = kind == "attention"
        # A writer that is a sum (MoE + shared experts) belongs to the block's module itself.
        name = layer_name(writer) if writer.target is aten.add.Tensor else _module_of(layer_name(writer))
        found.append(Sublayer(len(found), kind, name, block, node.name, stream.name, writer.name))
    return found


def node_named(gm: fx.GraphModule, name: str) -> fx.Node:
    for node in gm.graph.nodes:
        if node.name == name:
            return node
    raise GraphoptError(f"node '{name}' is not in the graph")


def remove_sublayers(gm: fx.GraphModule, sublayers: list[Sublayer]) -> int:
    """Bypass each sublayer's residual add and drop what only it used; returns bytes freed."""
    before = sum(t.numel() * t.element_size() for t in gm.state_dict().values())
    for sub in sorted(sublayers, key=lambda s: -s.index):   # later first: a stream may be an earlier add
        add = node_named(gm, sub.add)
        add.replace_all_uses_with(node_named(gm, sub.stream))
        gm.graph.erase_node(add)
    eliminate_dead_code(gm)
    remove_unused_attributes(gm)
    gm.recompile()
    return before - sum(t.numel() * t.element_size() for t in gm.state_dict().values())


@dataclass
class Score:
    js: float            # mean JS divergence from the unmodified model, nats
    nll: float           # mean next-token NLL on the batches (exp = perplexity); nan if not an LM

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll)


class SkipEvaluator:
    """Outputs of `gm` on `batches` with sets of sublayers bypassed, compared with the
    unmodified graph. Batches are input tuples whose first element is token ids [B, S] and
    whose first output is logits [B, S, V]."""

    def __init__(self, gm: fx.GraphModule, batches: list[tuple], sublayers: list[Sublayer]):
        if not batches:
            raise GraphoptError("sublayer evaluation needs calibration batches (compile(..., calibration=[...]))")
        self.gm, self.batches, self.sublayers = gm, list(batches), sublayers
        self.nodes = list(gm.graph.nodes)
        self.position = {n: i for i, n in enumerate(self.nodes)}
        by_name = {n.name: n for n in self.nodes}
        self.add_node = {s.index: by_name[s.add] for s in sublayers}
        self.stream_node = {s.index: by_name[s.stream] for s in sublayers}
        self.output_node = next(n for n in reversed(self.nodes) if n.op == "output")
        self.reference: list[torch.Tensor] = []
        self.base_envs: list[dict] | None = None
        self.base_removed: frozenset[int] = frozenset()
        with torch.no_grad():
            for batch in self.batches:
                env = self._run(batch, frozenset(), {}, 0)
                self.reference.append(log_probs(self._logits(env)))

    def _logits(self, env: dict) -> torch.Tensor:
        out = self.output_node.args[0]
        first = out[0] if isinstance(out, (tuple, list)) else out
        return env[first]

    def _run(self, batch: tuple, removed: frozenset[int], env: dict, start: int) -> dict:
        skip = {self.add_node[i]: self.stream_node[i] for i in removed}
        return run_from(self.gm, self.nodes, batch, env, start, skip)

    def rebase(self, removed: frozenset[int]) -> None:
        """Keep all intermediate values of a run with `removed` bypassed, so that scoring
        `removed | {i}` only re-runs the graph from sublayer i's add onward."""
        with torch.no_grad():
            self.base_envs = [self._run(b, frozenset(removed), {}, 0) for b in self.batches]
        self.base_removed = frozenset(removed)

    def values(self, removed: frozenset[int] | set[int], nodes: list[str]) -> list[dict[str, torch.Tensor]]:
        """Per batch, the values of `nodes` (names) with `removed` bypassed (after `rebase`)."""
        removed = frozenset(removed)
        if self.base_envs is None or not self.base_removed <= removed:
            self.rebase(frozenset())
        extra = removed - self.base_removed
        start = min((self.position[self.add_node[i]] for i in extra), default=len(self.nodes))
        wanted = [n for n in self.nodes if n.name in set(nodes)]
        out = []
        with torch.no_grad():
            for batch, env in zip(self.batches, self.base_envs):
                if extra:
                    env = self._run(batch, removed, {n: v for n, v in env.items() if self.position[n] < start}, start)
                out.append({n.name: env[n] for n in wanted})
        return out

    def score(self, removed: frozenset[int] | set[int]) -> Score:
        removed = frozenset(removed)
        start, envs = 0, None
        if self.base_envs is not None and self.base_removed <= removed:
            extra = removed - self.base_removed
            if extra:
                start = min(self.position[self.add_node[i]] for i in extra)
            envs = self.base_envs
        js = nll = 0.0
        tokens = 0
        with torch.no_grad():
            for b, (batch, ref) in enumerate(zip(self.batches, self.reference)):
                base = {n: v for n, v in envs[b].items() if self.position[n] < start} if envs else {}
                env = self._run(batch, removed, base, start if envs else 0)
                logits = self._logits(env)
                js += js_divergence(ref, log_probs(logits)) * ref.shape[0]
                batch_nll, count = next_token_nll(logits, batch[0])
                nll += batch_nll
                tokens += count
        rows = sum(r.shape[0] for r in self.reference)
        return Score(js / rows, nll / tokens if tokens else math.nan)


class SkipWorkload(GraphWorkload):
    """SkipEvaluator on an executor's workers. Candidates: ("score", base, removed) scores
    `removed` after rebasing on `base` (what greedy searches send: every worker rebases once
    per step); ("influence", indices) is the Block Influence of a unit on the unmodified model."""

    def __init__(self, gm: fx.GraphModule, batches: list[tuple], sublayers: list[Sublayer],
                 evaluator: SkipEvaluator | None = None):
        super().__init__(gm, batches[0])
        self.batches, self.sublayers = list(batches), sublayers
        self.local = evaluator

    def setup(self) -> SkipEvaluator:
        return self.local or SkipEvaluator(self.graph(), self.batches, self.sublayers)

    def evaluate(self, ev: SkipEvaluator, candidate) -> Score | float:
        kind, *rest = candidate
        if kind == "influence":
            if ev.base_envs is None or ev.base_removed:
                ev.rebase(frozenset())
            return block_influence(ev, rest[0])
        base, removed = rest
        if ev.base_envs is None or ev.base_removed != base:
            ev.rebase(base)
        return ev.score(removed)


def block_influence(ev: SkipEvaluator, indices: tuple[int, ...]) -> float:
    """ShortGPT's Block Influence of the consecutive sublayers `indices`: mean over tokens of
    1 - cos(stream before the first, stream after the last), on the evaluator's base run."""
    total, rows = 0.0, 0
    for env in ev.base_envs:
        before = env[ev.stream_node[indices[0]]]
        after = env[ev.add_node[indices[-1]]]
        cos = F.cosine_similarity(before.reshape(-1, before.shape[-1]).float(),
                                  after.reshape(-1, after.shape[-1]).float(), dim=-1)
        total += float((1 - cos).sum())
        rows += cos.numel()
    return total / rows


def branch_nodes(gm: fx.GraphModule, sub: Sublayer) -> set[fx.Node]:
    """The nodes that compute `sub`'s branch (from its read of the stream to its output linear)."""
    return _branch_nodes(node_named(gm, sub.writer), node_named(gm, sub.stream))


@dataclass
class Saturation:
    """Per FFN sublayer: how often a token's residual stream barely turns across it."""

    name: str
    index: int
    mean_cosine: float                     # mean over tokens of cos(h, h + FFN(h))
    fraction_above: dict[float, float]     # threshold -> fraction of tokens with cosine >= it


def ffn_saturation(evaluator: SkipEvaluator, thresholds=(0.9, 0.95, 0.99)) -> list[Saturation]:
    """FFN-SkipLLM's question on the unmodified model: per FFN, the distribution of the
    per-token cosine between the stream before and after it."""
    ffns = [s for s in evaluator.sublayers if s.kind == "ffn"]
    envs = evaluator.values(frozenset(), [n for s in ffns for n in (s.stream, s.add)])
    out = []
    for s in ffns:
        cos = torch.cat([F.cosine_similarity(env[s.stream].reshape(-1, env[s.stream].shape[-1]).float(),
                                             env[s.add].reshape(-1, env[s.add].shape[-1]).float(), dim=-1)
                         for env in envs])
        out.append(Saturation(s.name, s.index, float(cos.mean()),
                              {t: float((cos >= t).float().mean()) for t in thresholds}))
    return out


@dataclass
class AdaptivePoint:
    """One threshold of input-adaptive FFN skipping, simulated on the calibration batches."""

    threshold: float
    skip_ratio: float          # skipped FFN-token evaluations / all FFN-token evaluations (every layer)
    region_skip_ratio: float   # the same within the eligible region
    js: float
    nll: float

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll)


def adaptive_ffn_skipping(evaluator: SkipEvaluator, thresholds, region: tuple[int, int] | None = None,
                          span: int = 1, warmup: int = 25) -> list[AdaptivePoint]:
    """FFN-SkipLLM, token by token: attention always runs; an FFN in `region` (FFN numbers,
    [start, end)) whose per-token cos(h, h + FFN(h)) exceeds the threshold makes the next
    `span` FFNs of the region pass that token through. Positions before `warmup` run in full.
    Causal attention makes a prefill with these per-token decisions equal to decoding token by
    token with them, so this is the quality the control-flow version would have."""
    ffns = [s for s in evaluator.sublayers if s.kind == "ffn"]
    start, end = region if region is not None else (len(ffns) // 4, len(ffns) - len(ffns) // 4)
    eligible = {evaluator.add_node[s.index]: (k, evaluator.stream_node[s.index]) for k, s in enumerate(ffns)
                if start <= k < end}
    points = []
    for threshold in thresholds:
        js = nll = 0.0
        tokens = rows = skipped = region_evals = 0
        for batch, ref in zip(evaluator.batches, evaluator.reference):
            env, inputs = {}, iter(batch)
            interp = fx.Interpreter(evaluator.gm, garbage_collect_values=False)
            left = None
            with torch.no_grad():
                for node in evaluator.nodes:
                    if node.op == "output":
                        break
                    if node.op == "placeholder":
                        env[node] = next(inputs)
                        continue
                    interp.env = env
                    value = interp.run_node(node)
                    if node in eligible:
                        stream = env[eligible[node][1]]
                        flat_in = stream.reshape(-1, stream.shape[-1])
                        flat_out = value.reshape(-1, value.shape[-1])
                        if left is None:
                            left = torch.zeros(flat_in.shape[0], dtype=torch.long)
                        skip = left > 0
                        flat_out = torch.where(skip[:, None], flat_in, flat_out)
                        value = flat_out.reshape(value.shape)
                        cos = F.cosine_similarity(flat_in.float(), flat_out.float(), dim=-1)
                        positions = torch.arange(flat_in.shape[0]) % stream.shape[-2]
                        trigger = (~skip) & (cos > threshold) & (positions >= warmup)
                        left = torch.where(skip, left - 1, torch.where(trigger, span, 0))
                        skipped += int(skip.sum())
                        region_evals += skip.numel()
                    env[node] = value
            logits = evaluator._logits(env)
            js += js_divergence(ref, log_probs(logits)) * ref.shape[0]
            batch_nll, count = next_token_nll(logits, batch[0])
            nll, tokens, rows = nll + batch_nll, tokens + count, rows + ref.shape[0]
        total_evals = region_evals * len(ffns) / max(end - start, 1)
        points.append(AdaptivePoint(threshold, skipped / max(total_evals, 1), skipped / max(region_evals, 1),
                                    js / rows, nll / tokens if tokens else math.nan))
    return points
