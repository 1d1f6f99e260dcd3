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
                                            ("onnxruntime", "fuse")])
def test_presets_match_eager(smollm2, backend, preset, tmp_path):
    bundle, ids, logits = smollm2
    cm = graphopt.compile(bundle.model, (ids,), passes=preset, backend=backend, progress=False)
    assert_close_to_scale(cm(ids), logits, 1e-4)
    changes = [c for r in cm.records for c in r.changes]
    if preset == "fuse":
        assert sum("q_proj + " in c for c in changes) == 30 and sum("gate_proj + " in c for c in changes) == 30
    if backend == "onnxruntime":
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
