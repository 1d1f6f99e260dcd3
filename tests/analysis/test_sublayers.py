import copy

import pytest
import torch

import graphopt
from graphopt.analysis.sublayers import SkipEvaluator, find_sublayers, remove_sublayers
from graphopt.frontend.torch_export import capture
from graphopt.ir.graph import eliminate_dead_code, remove_unused_attributes
from graphopt.passes import ConstantFolding

from ..conftest import assert_close_to_scale


def _graph(name):
    bundle = graphopt.models.load(name)
    inputs = bundle.example_inputs(seq_len=16)
    gm = capture(bundle.model, inputs).graph_module
    ConstantFolding()(gm)
    return gm, bundle, inputs


@pytest.mark.parametrize("name,attention,ffn", [
    ("llama", "self_attn", "mlp"), ("qwen2", "self_attn", "mlp"), ("gpt2", "attn", "mlp"),
    ("bert", "attention", "output")])
def test_sublayers_are_found_by_pattern_in_every_family(name, attention, ffn):
    gm, _, _ = _graph(name)
    subs = find_sublayers(gm)
    assert [s.kind for s in subs] == ["attention", "ffn"] * 3
    assert [s.block for s in subs] == [0, 0, 1, 1, 2, 2]
    assert [s.index for s in subs] == list(range(6))
    for s in subs:
        assert f".{s.block}." in s.name
        assert (attention if s.kind == "attention" else ffn) in s.name


def test_removing_an_ffn_equals_zeroing_its_output_projection():
    gm, bundle, inputs = _graph("llama")
    ffn = [s for s in find_sublayers(gm) if s.kind == "ffn"][1]
    freed = remove_sublayers(gm, [ffn])
    layer = bundle.model.model.layers[1]
    own = list(layer.mlp.parameters()) + list(layer.post_attention_layernorm.parameters())   # the norm is the FFN's
    assert freed == sum(p.numel() * 4 for p in own)
    assert not any("layers_1_mlp" in name or "layers.1.mlp" in name for name, _ in gm.named_buffers())
    reference = copy.deepcopy(bundle.model)
    with torch.no_grad():
        reference.model.layers[1].mlp.down_proj.weight.zero_()
        expected = reference(*inputs).logits
    assert_close_to_scale(gm(*inputs)[0], expected, 1e-5)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_incremental_evaluation_equals_a_full_run(name):
    gm, bundle, _ = _graph(name)
    subs = find_sublayers(gm)
    batches = [bundle.example_inputs(seq_len=16, seed=s) for s in (1, 2)]
    ev = SkipEvaluator(gm, batches, subs)
    assert ev.score(set()).js < 1e-6
    full = ev.score({1, 4})
    ev.rebase(frozenset({1}))
    incremental = ev.score({1, 4})
    assert incremental.js == pytest.approx(full.js, rel=1e-5, abs=1e-9)
    assert incremental.nll == pytest.approx(full.nll, rel=1e-6)
    removed = copy.deepcopy(gm)
    remove_sublayers(removed, [subs[1], subs[4]])
    with torch.no_grad():
        nll = sum(torch.nn.functional.cross_entropy(removed(*b)[0][0, :-1], b[0][0, 1:], reduction="sum")
                  for b in batches) / (2 * 15)
    assert full.nll == pytest.approx(float(nll), rel=1e-5)
    assert full.js > 0


def test_adaptive_ffn_skipping_bounds():
    from graphopt.analysis.sublayers import adaptive_ffn_skipping
    gm, bundle, _ = _graph("llama")
    ev = SkipEvaluator(gm, [bundle.example_inputs(seq_len=16, seed=s) for s in (1, 2)], find_sublayers(gm))
    full = ev.score(frozenset())
    never, always = adaptive_ffn_skipping(ev, [2.0, -2.0], region=(0, 3), span=1, warmup=4)
    assert never.skip_ratio == 0 and never.js < 1e-9 and never.nll == pytest.approx(full.nll, rel=1e-6)
    # span 1 over 3 FFNs: monitor, skip, monitor -> one of three for the 12 positions past warmup
    assert always.region_skip_ratio == pytest.approx(12 / 48)
    assert always.js > 0


def test_removing_consecutive_sublayers_in_any_order():
    gm, bundle, inputs = _graph("llama")
    subs = find_sublayers(gm)
    expected_graph = copy.deepcopy(gm)
    remove_sublayers(expected_graph, [subs[4]])
    remove_sublayers(expected_graph, [subs[3]])
    remove_sublayers(gm, [subs[3], subs[4]])          # ffn[1] then attention[2], whose stream is ffn[1]'s add
    assert [s.label for s in find_sublayers(gm)] == ["attention[0]", "ffn[0]", "attention[1]", "ffn[1]"]
    assert_close_to_scale(gm(*inputs)[0], expected_graph(*inputs)[0], 1e-6)


def test_identity_residual_blocks_of_a_cnn_are_removable_sublayers():
    bundle = graphopt.models.load("resnet")
    inputs = bundle.example_inputs(size=32)
    gm = capture(bundle.model, inputs).graph_module
    eliminate_dead_code(gm)              # batch norms' num_batches_tracked
    remove_unused_attributes(gm)
    subs = find_sublayers(gm)
    # blocks 2 and 4 have a projection shortcut (1x1 conv + bn): not removable
    assert [(s.kind, s.name, s.block) for s in subs] == [
        ("block", "blocks.0", 0), ("block", "blocks.1", 1), ("block", "blocks.3", 2), ("block", "blocks.5", 3)]
    freed = remove_sublayers(gm, [subs[1], subs[2]])
    model = bundle.model
    own = [p for i in (1, 3) for m in (model.blocks[i].conv1, model.blocks[i].bn1, model.blocks[i].conv2,
                                       model.blocks[i].bn2) for p in list(m.parameters()) + list(m.buffers())
           if p.is_floating_point()]
    assert freed == sum(p.numel() * p.element_size() for p in own)
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for i in (1, 3):                 # a zero branch: relu(0 + x), what removing the add computes
            reference.blocks[i].bn2.weight.zero_()
            reference.blocks[i].bn2.bias.zero_()
        expected = reference(*inputs)
    assert_close_to_scale(gm(*inputs)[0], expected, 1e-6)


def test_an_lm_has_no_convolutional_blocks():
    gm, _, _ = _graph("gpt2")
    assert "block" not in {s.kind for s in find_sublayers(gm)}


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe", "deepseek_v3"])
def test_moe_blocks_are_ffn_sublayers_and_remove_like_one(name):
    gm, bundle, inputs = _graph(name)
    subs = find_sublayers(gm)
    assert [s.kind for s in subs] == ["attention", "ffn"] * 3
    assert [s.name for s in subs if s.kind == "ffn"] == [f"model.layers.{i}.mlp" for i in range(3)]
    remove_sublayers(gm, [subs[3]])
    reference = copy.deepcopy(bundle.model)
    mlp = reference.model.layers[1].mlp
    mlp.forward = lambda hidden_states: torch.zeros_like(hidden_states)
    with torch.no_grad():
        expected = reference(*inputs).logits
    assert_close_to_scale(gm(*inputs)[0], expected, 1e-5)
