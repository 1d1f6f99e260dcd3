"""The real default model, end to end (slow: loads 135M weights, exports ~540 MB of ONNX)."""
import pytest
import torch

import graphopt
from graphopt.corpus import read_text

from ..conftest import assert_close_to_scale

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    bundle = graphopt.models.load("smollm2")
    (ids,) = bundle.example_inputs(seq_len=128, text=read_text("evaluation.txt", 20000))
    with torch.no_grad():
        logits = bundle.model(input_ids=ids).logits
    return bundle, ids, logits


def test_real_weights_and_tokenizer(smollm2):
    bundle, ids, logits = smollm2
    assert sum(p.numel() for p in bundle.model.parameters()) == 134_515_008
    assert bundle.model.config.num_hidden_layers == 30
    top = logits[0, :-1].argmax(-1)
    assert (top == ids[0, 1:]).float().mean() > 0.3, "a real LM predicts much of English text"


@pytest.mark.parametrize("backend,preset", [("torch", "default"), ("onnxruntime", "default"),
                                            ("onnxruntime", "fuse"), ("tvm", "default"), ("tvm", "fuse")])
def test_presets_match_eager(smollm2, backend, preset, tmp_path):
    bundle, ids, logits = smollm2
    cm = graphopt.compile(bundle.model, (ids,), passes=preset, backend=backend, progress=False)
    assert_close_to_scale(cm(ids), logits, 1e-4)
    changes = [c for r in cm.records for c in r.changes]
    if preset == "fuse":
        assert sum("q_proj + " in c for c in changes) == 30 and sum("gate_proj + " in c for c in changes) == 30
    if backend != "torch":
        rt = graphopt.load(cm.save(str(tmp_path / "smollm2")))
        torch.testing.assert_close(rt(ids), cm(ids), rtol=0, atol=0)


def test_perplexity_on_evaluation_text_and_cli_eval(smollm2, tmp_path, capsys):
    from graphopt.analysis.quality import divergence, perplexity, token_windows
    from graphopt.cli import main
    bundle, ids, _ = smollm2
    windows = token_windows(bundle.tokenizer, read_text("evaluation.txt"), 128, max_tokens=2048)
    cm = graphopt.compile(bundle.model, (windows[0],), progress=False)
    eager = perplexity(bundle.model, windows, progress=False)
    compiled = perplexity(cm, windows, progress=False)
    assert 5 < eager.perplexity < 200, "a real LM (random weights: ~49152)"
    assert compiled.perplexity == pytest.approx(eager.perplexity, rel=1e-4)
    assert divergence(bundle.model, cm, windows[:2], progress=False).js < 1e-8
    path = cm.save(str(tmp_path / "art"))
    assert main(["eval", "--artifact", path, "--max-tokens", "512"]) == 0
    out = capsys.readouterr().out
    assert "smollm2 eager: perplexity" in out and "top-1 agreement" in out


def test_super_weight_found_and_proved_by_ablation(smollm2):
    from graphopt.analysis.quality import perplexity, token_windows
    from graphopt.analysis.super_weights import ablate, find_super_weights
    from graphopt.frontend.torch_export import capture
    bundle, ids, _ = smollm2
    gm = capture(bundle.model, (ids,)).graph_module
    report = find_super_weights(gm, (ids,))
    found = {(sw.layer.split("layers.")[-1], sw.row, sw.col): sw for sw in report.super_weights}
    assert ("11.mlp.down_proj", 507, 1229) in found and 507 in report.super_activation_channels
    windows = token_windows(bundle.tokenizer, read_text("evaluation.txt"), 128, max_tokens=512)
    base = perplexity(gm, windows, progress=False).perplexity
    with ablate(gm, found[("11.mlp.down_proj", 507, 1229)]):
        zeroed = perplexity(gm, windows, progress=False).perplexity
    assert zeroed > 3 * base, (base, zeroed)


def test_int4_artifact_is_small_and_close(smollm2, tmp_path):
    import os

    from graphopt.analysis.quality import perplexity, token_windows
    bundle, ids, logits = smollm2
    windows = token_windows(bundle.tokenizer, read_text("evaluation.txt"), 128, max_tokens=1024)
    calibration = [(w,) for w in token_windows(bundle.tokenizer, read_text("calibration.txt"), 128, 512)]
    cm = graphopt.compile(bundle.model, (ids,), passes="int4", calibration=calibration, progress=False)
    path = cm.save(str(tmp_path / "int4"))
    size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
    assert size < 0.35 * 542.8e6, size
    rt = graphopt.load(path)
    torch.testing.assert_close(rt(ids), cm(ids), rtol=0, atol=0)
    eager = perplexity(bundle.model, windows, progress=False).perplexity
    # the GGUF's own Q4_1 grid comes back exactly; int8 activations in MatMulNBits cost < 1%
    assert perplexity(cm, windows, progress=False).perplexity < 1.01 * eager


def test_sublayers_and_finercut_on_the_real_model(smollm2):
    from graphopt.analysis.quality import token_windows
    from graphopt.analysis.sublayers import SkipEvaluator, find_sublayers
    from graphopt.frontend.torch_export import capture
    from graphopt.passes.layer_skipping import rank_removals
    bundle, ids, _ = smollm2
    gm = capture(bundle.model, (ids,)).graph_module
    subs = find_sublayers(gm)
    assert [s.kind for s in subs] == ["attention", "ffn"] * 30
    assert subs[-1].name == "model.layers.29.mlp" and subs[-1].block == 29
    batches = [(w,) for w in token_windows(bundle.tokenizer, read_text("calibration.txt"), 128, 256)]
    ev = SkipEvaluator(gm, batches, subs)
    base = ev.score(frozenset()).perplexity
    first_ffn = ev.score(frozenset({1})).perplexity          # layers.0.mlp turns the embedding (cos 0.05)
    best = rank_removals(gm, batches, "finercut-oneshot", 1, kinds=("attention",), evaluator=ev, progress=False)[0]
    assert best.unit[0].kind == "attention"
    assert first_ffn > 3 * base and best.perplexity < 1.1 * base, (base, first_ffn, best.perplexity)


def test_channel_analysis_and_pruning_on_real_weights(smollm2):
    from graphopt.analysis.channels import ChannelAnalysis
    from graphopt.frontend.torch_export import capture
    from graphopt.passes import ChannelPruning, PassContext

    bundle, ids, logits = smollm2
    gm = capture(bundle.model, (ids,)).graph_module
    analysis = ChannelAnalysis(gm)
    stream = max(analysis.segments, key=lambda s: len(s.consumers))
    assert len(stream.channels) == 576 and len(stream.consumers) == 30 * 5 + 1   # q, k, v, gate, up per layer + lm_head
    assert all(c in analysis.needed and c not in analysis.frozen for c in stream.channels)
    ffns = [s for s in analysis.segments if len(s.channels) == 1536]
    assert len(ffns) == 30 and all(len(s.producers) == 2 and len(s.consumers) == 1 for s in ffns)
    prune = ChannelPruning(ratio=0.3, mode="constrained", importance="activation")
    with torch.no_grad():
        out = prune(gm, PassContext((ids,))).graph_module(ids)[0]
    assert prune.stats.consumers_gather == prune.stats.consumers_slice == 0
    # only the FFN intermediates can go in constrained mode (the RMSNorms pin the stream): 1075 kept -> 1088
    assert prune.stats.consumer_columns_after == prune.stats.consumer_columns_before - 30 * (1536 - 1088)
    agreement = float((out[0, :-1].argmax(-1) == logits[0, :-1].argmax(-1)).float().mean())
    assert agreement > 0.3


def test_generation_artifact_greedy_text_equals_hugging_face(smollm2, tmp_path):
    bundle, _, _ = smollm2
    model, tokenizer = bundle.model, bundle.tokenizer
    cm = graphopt.compile(model, task="text-generation", tokenizer=tokenizer, progress=False)
    lm = graphopt.load(cm.save(str(tmp_path / "gen")))
    model.config.use_cache = True
    try:
        for prompt in ("The capital of France is", "def fibonacci(n):"):
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            with torch.no_grad():
                ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False)
            expected = tokenizer.decode(ref[0, ids.shape[1]:], skip_special_tokens=True)
            assert lm.generate(prompt, max_new_tokens=24) == expected
        chat = lm.generate("What is the capital of France?", chat=True, max_new_tokens=16)
        assert "Paris" in chat
    finally:
        model.config.use_cache = False
    assert lm.manifest["task"]["chat_template"] and lm.manifest["task"]["eos_token_ids"] == [2]
