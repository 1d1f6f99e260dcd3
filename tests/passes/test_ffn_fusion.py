import copy

import pytest
import torch

import graphopt
from graphopt.analysis.sublayers import find_sublayers
from graphopt.errors import GraphoptError
from graphopt.frontend.torch_export import capture
from graphopt.passes import ConstantFolding, DeadCodeElimination, PassContext
from graphopt.passes.ffn_fusion import FFNFusion, ffn_runs
from graphopt.passes.layer_skipping import LayerSkipping

from ..conftest import assert_close_to_scale


def _without_attention(name, keep_first=False):
    """The captured model with its attention sublayers removed (all, or all but the first)."""
    bundle = graphopt.models.load(name)
    inputs = bundle.example_inputs(seq_len=16)
    gm = capture(bundle.model, inputs).graph_module
    ConstantFolding()(gm)
    attention = [s.name for s in find_sublayers(gm) if s.kind == "attention"]
    LayerSkipping(remove=tuple(attention[1:] if keep_first else attention))(gm)
    return gm, bundle, inputs


def _parallel_reference(name, bundle, ids):
    """X + sum_k FFN_k(X) written against the Hugging Face modules, then the head."""
    with torch.no_grad():
        if name == "gpt2":
            t = bundle.model.transformer
            x = t.wte(ids) + t.wpe(torch.arange(ids.shape[1]))[None]
            out = x + sum(block.mlp(block.ln_2(x)) for block in t.h)
            return bundle.model.lm_head(t.ln_f(out))
        m = bundle.model.model
        x = m.embed_tokens(ids)
        out = x + sum(layer.mlp(layer.post_attention_layernorm(x)) for layer in m.layers)
        return bundle.model.lm_head(m.norm(out))


@pytest.mark.parametrize("name", ["llama", "qwen2", "gpt2"])
def test_fused_ffn_equals_the_sum_of_the_parallel_ffns(name):
    gm, bundle, inputs = _without_attention(name)
    names = tuple(s.name for s in find_sublayers(gm) if s.kind == "ffn")
    assert len(names) == 3 and [len(r) for r in ffn_runs(find_sublayers(gm))] == [3]
    parallel = copy.deepcopy(gm)
    FFNFusion(runs=(names,), mode="parallel")(parallel)
    fused = copy.deepcopy(gm)
    result = FFNFusion(runs=(names,))(fused)
    assert "one FFN of width" in result.changes[0]
    expected = _parallel_reference(name, bundle, inputs[0])
    assert_close_to_scale(parallel(*inputs)[0], expected, 1e-5)
    assert_close_to_scale(fused(*inputs)[0], expected, 1e-5)
    subs = find_sublayers(fused)
    assert [s.kind for s in subs] == ["ffn"]                 # one wide FFN is left
    config = bundle.model.config
    hidden, width = (
        (config.n_embd, 4 * config.n_embd) if name == "gpt2" else (config.hidden_size, config.intermediate_size)
    )
    out_weight = next(t for n, t in fused.named_buffers() if n.endswith("fused_out_weight"))
    assert sorted(out_weight.shape) == sorted((hidden, 3 * width))
    sequential = gm(*inputs)[0]
    assert float((sequential - expected).detach().abs().max()) > 1e-4    # parallelization is the approximation


def test_fusing_part_of_a_run_lowers_to_onnxruntime():
    bundle = graphopt.models.load("llama")      # 3 layers: without attention 1 and 2, FFNs 0-2 are consecutive
    inputs = bundle.example_inputs(seq_len=16)
    calibration = [bundle.example_inputs(seq_len=16, seed=s) for s in (1, 2)]

    def passes():
        return [ConstantFolding(), LayerSkipping(remove=("model.layers.1.self_attn", "model.layers.2.self_attn")),
                FFNFusion(runs=(("model.layers.0.mlp", "model.layers.1.mlp"),)), DeadCodeElimination()]
    cm = graphopt.compile(bundle.model, inputs, passes=passes(), calibration=calibration, progress=False)
    fusion = next(r for r in cm.records if r.name == "ffn_fusion")
    assert fusion.modified and 0 < fusion.quality["js"] < 0.05
    reference = graphopt.compile(bundle.model, inputs, passes=passes(), backend="torch", progress=False)
    assert_close_to_scale(cm(*inputs)[0], reference(*inputs)[0], 1e-5)


def test_runs_are_chosen_by_dependency_under_the_budgets():
    gm, bundle, inputs = _without_attention("gpt2", keep_first=True)
    calibration = [bundle.example_inputs(seq_len=16, seed=s) for s in (1, 2, 3)]
    strict = FFNFusion(max_dependency=0.0)
    assert not strict(copy.deepcopy(gm), PassContext(inputs, calibration=calibration)).modified
    chooser = FFNFusion(max_dependency=1.0, max_perplexity_increase=1.0)
    result = chooser(gm, PassContext(inputs, calibration=calibration))
    assert result.modified and chooser.groups == [["transformer.h.0.mlp", "transformer.h.1.mlp", "transformer.h.2.mlp"]]
    matrix = next(iter(chooser.dependencies.values()))
    assert matrix.shape == (3, 3) and float(matrix.tril().abs().max()) == 0
    assert 0 < float(matrix[0, 1]) < 2
    assert "calibration perplexity" in result.notes[-1]


def test_attention_between_ffns_is_refused():
    gm, _, inputs = _without_attention("llama", keep_first=True)
    full = capture(graphopt.models.load("llama").model, inputs).graph_module
    with pytest.raises(GraphoptError, match="not consecutive FFNs"):
        FFNFusion(runs=(("model.layers.0.mlp", "model.layers.1.mlp"),))(full, PassContext(inputs))
    with pytest.raises(GraphoptError, match="is an attention sublayer"):
        FFNFusion(runs=(("model.layers.0.self_attn", "model.layers.0.mlp"),))(gm, PassContext(inputs))
    with pytest.raises(GraphoptError, match="calibration batches"):
        FFNFusion()(gm, PassContext(inputs))


def test_moe_ffns_get_their_dependency_measured_and_are_not_fused():
    gm, bundle, inputs = _without_attention("mixtral", keep_first=True)
    calibration = [bundle.example_inputs(seq_len=16, seed=s) for s in (1, 2, 3)]
    chooser = FFNFusion(max_dependency=1.0, max_perplexity_increase=1.0)
    result = chooser(gm, PassContext(inputs, calibration=calibration))
    assert not result.modified
    matrix = chooser.dependencies["model.layers.0.mlp"]
    assert matrix.shape == (3, 3) and 0 < float(matrix[0, 1]) < 2
    assert "mixture-of-experts FFNs, dependency measured" in result.notes[0]
    with pytest.raises(GraphoptError, match="model.layers.0.mlp is a mixture-of-experts block"):
        FFNFusion(runs=(("model.layers.0.mlp", "model.layers.1.mlp"),))(gm, PassContext(inputs))
