import pytest
import torch

import graphopt
from graphopt.errors import PassError
from graphopt.passes import ConstantFolding, DeadCodeElimination
from graphopt.passes.adaptive_ffn_skipping import AdaptiveFFNSkipping

from ..conftest import assert_close_to_scale


def _compile(bundle, ids, threshold, backend):
    passes = [ConstantFolding(), AdaptiveFFNSkipping(threshold=threshold, region=(0, 3), span=2), DeadCodeElimination()]
    return graphopt.compile(bundle.model, ids, passes=passes, backend=backend, progress=False)


def _logits(cm, ids):
    out = cm(*ids)
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("name", ["llama", "gpt2", "mixtral"])
def test_if_lowering_runs_or_skips_the_ffns(name):
    bundle = graphopt.models.load(name)
    ids = bundle.example_inputs(seq_len=1)
    with torch.no_grad():
        eager = bundle.model(*ids).logits
    never = _compile(bundle, ids, 2.0, "onnxruntime")             # cos never > 2: every FFN runs
    assert_close_to_scale(_logits(never, ids), eager, 1e-5)
    always = _compile(bundle, ids, -2.0, "onnxruntime")           # FFNs 1 and 2 always skipped
    reference = _compile(bundle, ids, -2.0, "torch")
    assert_close_to_scale(_logits(always, ids), _logits(reference, ids), 1e-5)
    assert float((_logits(always, ids) - eager).abs().max()) > 1e-4
    record = next(r for r in always.records if r.name == "adaptive_ffn_skipping")
    assert len(record.changes) == 2 and "runs only when" in record.changes[0]
    import onnx
    with __import__("tempfile").TemporaryDirectory() as tmp:
        path = always.save(tmp)
        model = onnx.load(f"{path}/model.onnx", load_external_data=False)
        assert sum(n.op_type == "If" for n in model.graph.node) == 2


def test_needs_a_single_token_graph():
    bundle = graphopt.models.load("llama")
    with pytest.raises(PassError, match="must take one token"):
        _compile(bundle, bundle.example_inputs(seq_len=4), 0.9, "torch")
