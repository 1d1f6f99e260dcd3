"""Attention-head pruning: found by pattern on several families, equal to the model with the
dropped heads' output columns zeroed, identity at ratio 0, smaller ONNX artifacts."""
import copy

import pytest
import torch

import graphopt
from graphopt.analysis.quality import js_divergence, log_probs
from graphopt.errors import GraphoptError, PreconditionError
from graphopt.frontend.torch_export import capture
from graphopt.passes import AttentionHeadPruning, DeadCodeElimination
from graphopt.passes.head_pruning import _reshape_shape, find_attentions

from ..conftest import assert_close_to_scale, eager_outputs, small_inputs


def _masked(model, pruned):
    masked = copy.deepcopy(model)
    for info in pruned.values():
        weight = masked.get_submodule(info.output_module).weight
        weight.data[:, info.dropped_query_columns()] = 0
    return masked


@pytest.mark.parametrize("name, ratio", [("llama", 0.5), ("qwen2", 0.5), ("mistral", 0.5), ("bert", 0.25),
                                         ("bert", 0.5)])
def test_pruned_graph_equals_the_model_with_dropped_heads_zeroed(name, ratio):
    bundle = graphopt.models.load(name)
    inputs = small_inputs(bundle)
    prune = AttentionHeadPruning(ratio=ratio, importance="l2", scope="layer")
    cm = graphopt.compile(bundle.model, inputs, passes=[prune, DeadCodeElimination()], backend="onnxruntime",
                          progress=False)
    layers = bundle.model.config.num_hidden_layers
    assert len(prune.pruned) == layers
    for info in prune.pruned.values():
        assert len(info.kept_groups) == info.groups - round(info.groups * ratio)
    outs = cm(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    for got, want in zip(outs, eager_outputs(_masked(bundle.model, prune.pruned), inputs), strict=True):
        assert_close_to_scale(got, want, 1e-5)


def test_grouped_query_heads_go_with_their_key_value_head():
    bundle = graphopt.models.load("llama")     # 4 query heads over 2 key/value heads
    gm = capture(bundle.model, small_inputs(bundle)).graph_module
    (first, *_) = find_attentions(gm)
    assert (first.q_heads, first.kv_heads, first.head_dim) == (4, 2, 16)
    AttentionHeadPruning(ratio=0.5, importance="l2")(gm)
    (after, *_) = find_attentions(gm)
    assert (after.q_heads, after.kv_heads) == (2, 1)
    assert tuple(after.o.meta["val"].shape) == tuple(first.o.meta["val"].shape)


def test_ratio_zero_is_the_identity_and_artifacts_shrink(tmp_path):
    bundle = graphopt.models.load("qwen2")
    inputs = small_inputs(bundle)
    none = AttentionHeadPruning(ratio=0.0)
    cm = graphopt.compile(bundle.model, inputs, passes=[none], backend="torch", progress=False)
    assert not cm.records[0].modified
    torch.testing.assert_close(cm(*inputs), eager_outputs(bundle.model, inputs)[0], rtol=0, atol=0)
    graphopt.compile(bundle.model, inputs, backend="onnxruntime", progress=False).save(str(tmp_path / "a"))
    graphopt.compile(bundle.model, inputs, passes=[AttentionHeadPruning(ratio=0.5), DeadCodeElimination()],
                            backend="onnxruntime", progress=False).save(str(tmp_path / "b"))
    size = lambda path: (tmp_path / path / "model.onnx.data").stat().st_size   # noqa: E731
    cfg = bundle.model.config
    kv_width = cfg.hidden_size * cfg.num_key_value_heads // cfg.num_attention_heads
    attention_bytes = 4 * cfg.num_hidden_layers * (cfg.hidden_size * (cfg.hidden_size + 2 * kv_width)   # q, k, v
                                                   + cfg.hidden_size * cfg.hidden_size)                 # o
    assert size("a") - size("b") == pytest.approx(attention_bytes / 2, rel=0.05)


def test_reshape_literals_follow_the_head_count():
    assert _reshape_shape((1, 2, 2, 16, 16), (1, 1, 2, 16, 16), [1, 4, 16, 16]) == [1, 2, 16, 16]
    assert _reshape_shape((1, 16, 64), (1, 16, 32), [1, 16, 4, 16]) == [1, 16, 2, 16]
    assert _reshape_shape((1, 4, 16, 16), (1, 2, 16, 16), [1, 4, -1, 16]) == [1, 2, -1, 16]


def test_unsupported_layouts_and_options_are_named():
    bundle = graphopt.models.load("gpt2")     # one fused c_attn projection
    gm = capture(bundle.model, small_inputs(bundle)).graph_module
    with pytest.raises(PreconditionError, match="cannot find separate q/k/v"):
        AttentionHeadPruning(ratio=0.5)(gm)
    with pytest.raises(GraphoptError, match="ratio must be in"):
        AttentionHeadPruning(ratio=1.0)


def test_ablation_scores_are_the_divergence_of_zeroing_each_group():
    bundle = graphopt.models.load("llama")
    inputs = small_inputs(bundle)
    prune = AttentionHeadPruning(ratio=0.25, progress=False)
    graphopt.compile(bundle.model, inputs, passes=[prune, DeadCodeElimination()], backend="torch", progress=False)
    reference = log_probs(eager_outputs(bundle.model, inputs)[0])
    name = "model.layers.1.self_attn"
    assert len(prune.scores) == bundle.model.config.num_hidden_layers
    for group, score in enumerate(prune.scores[name]):
        info = type("Group", (), {"output_module": name + ".o_proj",
                                  "dropped_query_columns": lambda self, g=group: list(range(g * 32, (g + 1) * 32))})
        ablated = log_probs(eager_outputs(_masked(bundle.model, {name: info()}), inputs)[0])
        assert score == pytest.approx(js_divergence(reference, ablated), rel=1e-4, abs=1e-9)
        assert score > 0


def test_global_scope_drops_the_least_important_groups_overall():
    bundle = graphopt.models.load("qwen2")
    inputs = small_inputs(bundle)
    prune = AttentionHeadPruning(ratio=0.5, min_groups=1, progress=False)
    cm = graphopt.compile(bundle.model, inputs, passes=[prune, DeadCodeElimination()], backend="onnxruntime",
                          progress=False)
    groups = {name: len(s) for name, s in prune.scores.items()}
    dropped = {(name, g) for name, info in prune.pruned.items() for g in range(info.groups)
               if g not in info.kept_groups}
    assert len(dropped) == round(0.5 * sum(groups.values()))
    assert all(len(info.kept_groups) >= 1 for info in prune.pruned.values())
    # every dropped group scored no higher than any kept group of an attention that could still lose one
    worst_dropped = max(prune.scores[n][g] for n, g in dropped)
    spare = [prune.scores[n][g] for n, s in prune.scores.items() for g in range(len(s))
             if (n, g) not in dropped and groups[n] - sum(1 for d in dropped if d[0] == n) > 1]
    assert all(worst_dropped <= v for v in spare)
    outs = cm(*inputs)
    want = eager_outputs(_masked(bundle.model, prune.pruned), inputs)
    assert_close_to_scale(outs if not isinstance(outs, tuple) else outs[0], want[0], 1e-5)


def test_bad_head_pruning_options():
    with pytest.raises(GraphoptError, match="scope must be"):
        AttentionHeadPruning(scope="model")
    with pytest.raises(GraphoptError, match="importance must be"):
        AttentionHeadPruning(importance="l1")
