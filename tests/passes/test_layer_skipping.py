import json
import math
import os

import pytest

import graphopt
from graphopt.analysis.sublayers import SkipEvaluator, find_sublayers
from graphopt.errors import GraphoptError, PassError
from graphopt.frontend.torch_export import capture
from graphopt.passes import ConstantFolding, DeadCodeElimination, PassContext
from graphopt.passes.layer_skipping import LayerSkipping, rank_removals


def _setup(name):
    bundle = graphopt.models.load(name)
    inputs = bundle.example_inputs(seq_len=16)
    gm = capture(bundle.model, inputs).graph_module
    ConstantFolding()(gm)
    batches = [bundle.example_inputs(seq_len=16, seed=s) for s in (1, 2, 3)]
    return gm, bundle, inputs, batches


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_finercut_greedy_takes_the_least_divergent_candidate_at_every_step(name):
    gm, _, _, batches = _setup(name)
    steps = rank_removals(gm, batches, "finercut", 3, progress=False)
    ev = SkipEvaluator(gm, batches, find_sublayers(gm))   # no rebase: every score is a full run
    removed = frozenset()
    for step in steps:
        chosen = removed | {s.index for s in step.unit}
        others = [ev.score(removed | {s.index}).js for s in find_sublayers(gm) if s.index not in chosen]
        assert ev.score(chosen).js == pytest.approx(step.js, rel=1e-5)
        assert step.js <= min(others) + 1e-12
        removed = chosen
    one_shot = rank_removals(gm, batches, "finercut-oneshot", 1, progress=False)
    assert one_shot[0].names == steps[0].names         # the first greedy step is the one-shot argmin


def test_tail_and_block_influence_orders():
    gm, _, _, batches = _setup("qwen2")
    subs = find_sublayers(gm)
    tail = rank_removals(gm, None, "tail", 3)
    assert [s.unit[0].index for s in tail] == [5, 4, 3]
    bi = rank_removals(gm, batches, "bi", 6, progress=False)
    assert sorted(s.unit[0].index for s in bi) == [s.index for s in subs]
    assert [s.metric for s in bi] == sorted(s.metric for s in bi)
    assert all(0 <= s.metric <= 2 for s in bi)
    blocks = rank_removals(gm, batches, "bi", 2, granularity="block", progress=False)
    assert all(len(step.unit) == 2 and step.unit[0].block == step.unit[1].block for step in blocks)


def test_pass_removes_the_budget_and_its_weights():
    gm, bundle, inputs, batches = _setup("llama")
    before = sum(t.numel() for t in gm.state_dict().values())
    p = LayerSkipping(method="finercut", sublayers=2, kinds=("attention",), progress=False)
    result = p(gm, PassContext(inputs, calibration=batches))
    assert result.modified and len(p.steps) == 2
    assert [s.kind for s in find_sublayers(gm)].count("attention") == 1
    removed = sum(t.numel() for t in gm.state_dict().values())
    attn = bundle.model.model.layers[0].self_attn
    per_attention = sum(q.numel() for q in attn.parameters()) + bundle.model.config.hidden_size   # + its norm
    assert 2 * per_attention <= before - removed <= 2 * per_attention + 2 * 512   # + folded rotary tables


def test_perplexity_budget_stops_before_the_first_step_over_it():
    gm, _, inputs, batches = _setup("gpt2")
    p = LayerSkipping(method="bi", max_perplexity_increase=0.001, progress=False)
    ev = SkipEvaluator(gm, batches, find_sublayers(gm))
    limit = ev.score(frozenset()).perplexity * 1.001
    full_order = rank_removals(gm, batches, "bi", 6, progress=False)
    p(gm, PassContext(inputs, calibration=batches))
    kept = len(p.steps)
    assert all(s.perplexity <= limit for s in p.steps)
    assert kept == len(full_order) or full_order[kept].perplexity > limit


def test_budget_and_names_are_checked():
    gm, _, inputs, batches = _setup("llama")
    with pytest.raises(GraphoptError, match="needs a budget"):
        LayerSkipping()(gm, PassContext(inputs, calibration=batches))
    with pytest.raises(GraphoptError, match="needs calibration batches"):
        LayerSkipping(method="finercut", sublayers=1)(gm, PassContext(inputs))
    with pytest.raises(GraphoptError, match="no sublayer named.*found: model.layers.0.self_attn"):
        LayerSkipping(remove=("layers.9.mlp",))(gm, PassContext(inputs))
    with pytest.raises(GraphoptError, match="unknown layer-skipping method"):
        LayerSkipping(method="random", sublayers=1)(gm, PassContext(inputs, calibration=batches))


def test_compile_records_the_quality_cost_in_the_manifest(tmp_path):
    bundle = graphopt.models.load("gpt2")
    inputs = bundle.example_inputs(seq_len=16)
    calibration = [bundle.example_inputs(seq_len=16, seed=s) for s in (1, 2)]
    passes = [ConstantFolding(), LayerSkipping(method="finercut-oneshot", sublayers=2, progress=False),
              DeadCodeElimination()]
    cm = graphopt.compile(bundle.model, inputs, passes=passes, calibration=calibration, progress=False)
    cm.save(str(tmp_path / "a"))
    with open(os.path.join(tmp_path, "a", "manifest.json")) as f:
        records = json.load(f)["passes"]
    skip = next(r for r in records if r["name"] == "layer_skipping")
    q = skip["quality"]
    assert q["rows"] == 32 and 0 < q["js"] < math.log(2) and 0 <= q["top1_agreement"] <= 1
    assert q["perplexity_before"] > 1 and q["perplexity_after"] > 1
    assert next(r for r in records if r["name"] == "constant_folding")["quality"] is None   # exact passes
    assert "quality on 32 calibration rows" in cm.summary()


def test_unknown_pattern_is_a_clear_error():
    import torch
    gm = capture(torch.nn.Linear(4, 4), (torch.randn(2, 4),)).graph_module
    with pytest.raises(PassError, match="no residual sublayers found"):
        graphopt.passes.PassManager([LayerSkipping(sublayers=1, method="tail")]).run(gm, PassContext())


def test_a_cnn_search_is_refused_and_named_blocks_are_removed():
    bundle = graphopt.models.load("resnet")
    inputs = bundle.example_inputs(size=32)
    gm = capture(bundle.model, inputs).graph_module
    with pytest.raises(PassError, match=r"this model's are block \(blocks.0, blocks.1, blocks.3, blocks.5\)"):
        graphopt.passes.PassManager([LayerSkipping(sublayers=1)]).run(gm, PassContext(inputs, calibration=[inputs]))
    result = graphopt.passes.PassManager([LayerSkipping(remove=("blocks.3",))]).run(gm, PassContext(inputs))
    assert [s.name for s in find_sublayers(result.graph_module)] == ["blocks.0", "blocks.1", "blocks.5"]
