"""KV-cache decode steps: captured with a dynamic past length, lowered, equal to the full
forward's last position, and rewritable by the adaptive FFN skipping pass."""
import pytest
import torch

import graphopt
from graphopt.frontend.decode import DecodeStep, generate_greedy, past_dims, prefill_cache
from graphopt.passes import ConstantFolding, DeadCodeElimination
from graphopt.passes.adaptive_ffn_skipping import AdaptiveFFNSkipping

from ..conftest import assert_close_to_scale


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def decode(request):
    bundle = graphopt.models.load(request.param)
    ids = bundle.example_inputs(seq_len=12)[0]
    past = prefill_cache(bundle.model, ids[:, :-1])
    cm = graphopt.compile(DecodeStep(bundle.model), (ids[:, -1:], *past), dynamic_dims=past_dims(bundle.model),
                          backend="onnxruntime", progress=False)
    return bundle, ids, past, cm


def test_step_equals_the_full_forward_at_any_past_length(decode):
    bundle, ids, past, cm = decode
    for seq_len, seed in ((12, 0), (40, 3)):
        ids = bundle.example_inputs(seq_len=seq_len, seed=seed)[0]
        with torch.no_grad():
            full = bundle.model(ids).logits[:, -1]
        logits, *present = cm(ids[:, -1:], *prefill_cache(bundle.model, ids[:, :-1]))
        assert_close_to_scale(logits[:, -1], full, 1e-5)
        assert present[0].shape[2] == seq_len
    assert len(cm.inputs) == 1 + 2 * bundle.model.config.num_hidden_layers


def test_greedy_generation_matches_hugging_face(decode):
    bundle, ids, _, cm = decode
    with torch.no_grad():
        expected = bundle.model.generate(ids, max_new_tokens=6, do_sample=False)[:, ids.shape[1]:]
    torch.testing.assert_close(generate_greedy(cm, ids, bundle.model, 6), expected)


def test_adaptive_ffn_skipping_on_the_cached_step(decode):
    bundle, ids, past, cm = decode
    inputs = (ids[:, -1:], *past)

    def compiled(threshold):
        return graphopt.compile(DecodeStep(bundle.model), inputs, dynamic_dims=past_dims(bundle.model),
                                backend="onnxruntime", progress=False,
                                passes=[ConstantFolding(), AdaptiveFFNSkipping(threshold=threshold, region=(0, 2)),
                                        DeadCodeElimination()])
    plain = cm(*inputs)[0]
    never = compiled(2.0)
    assert any(r.name == "adaptive_ffn_skipping" and r.changes for r in never.records)
    assert_close_to_scale(never(*inputs)[0], plain, 1e-6)    # the If graph fuses differently
    always = compiled(-2.0)(*inputs)[0]
    assert float((always - plain).abs().max()) > 1e-3, "skipping an FFN changes the logits"


def test_wrong_cache_length_is_a_clear_error():
    bundle = graphopt.models.load("llama")
    with pytest.raises(ValueError, match=r"takes 6 cache tensors \(keys and values of 3 layers\), got 1"):
        DecodeStep(bundle.model)(torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 2, 3, 16))
