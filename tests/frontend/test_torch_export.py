import pytest
import torch

import graphopt
from graphopt.errors import CaptureError, GraphoptError, InputSpecError
from graphopt.frontend.torch_export import capture, sequence_dims
from graphopt.specs import TensorSpec

from ..conftest import assert_close_to_scale, eager_outputs, small_inputs


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert", "resnet"])
def test_capture_keeps_specs_shapes_and_numerics(name):
    bundle = graphopt.models.load(name)
    inputs = small_inputs(bundle)
    cm = capture(bundle.model, inputs)
    assert [s.shape for s in cm.inputs] == [tuple(i.shape) for i in inputs]
    gm = cm.graph_module
    calls = [n for n in gm.graph.nodes if n.op == "call_function"]
    assert calls and all("val" in n.meta for n in calls if n.meta.get("val") is not None)
    for out, ref in zip(cm(*inputs), eager_outputs(bundle.model, inputs)):
        assert_close_to_scale(out, ref, 1e-6)


def test_capture_records_module_paths_and_output_names():
    bundle = graphopt.models.load("llama")
    cm = capture(bundle.model, small_inputs(bundle))
    assert cm.outputs[0].name == "logits"
    linear = next(n for n in cm.graph_module.graph.nodes if n.target == torch.ops.aten.linear.default)
    from graphopt.ir.graph import describe
    assert "layers.0.self_attn.q_proj" in describe(linear)
    assert "modeling_llama.py" in describe(linear)


def test_dynamic_sequence_length():
    bundle = graphopt.models.load("gpt2")
    inputs = bundle.example_inputs(seq_len=16)
    cm = capture(bundle.model, inputs, sequence_dims(inputs))
    assert cm.inputs[0].shape == (1, "seq")
    longer = bundle.example_inputs(seq_len=24, seed=3)
    assert_close_to_scale(cm(*longer)[0], eager_outputs(bundle.model, longer)[0], 1e-6)


def test_keyword_inputs_become_positional_in_dict_order():
    bundle = graphopt.models.load("bert")
    ids, mask = bundle.example_inputs(seq_len=8)
    cm = capture(bundle.model, {"input_ids": ids, "attention_mask": mask})
    assert [s.name for s in cm.inputs] == ["input_ids", "attention_mask"]


def test_non_tensor_input_is_a_one_line_error():
    with pytest.raises(CaptureError, match="example input 'input' is int"):
        capture(torch.nn.Linear(2, 2), (3,))


def test_uncapturable_model_names_the_model():
    class DataDependent(torch.nn.Module):
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x

    with pytest.raises(CaptureError, match="could not capture DataDependent") as info:
        capture(DataDependent(), (torch.randn(3),))
    assert "\n" not in str(info.value)


def test_tensor_spec_checks_shape_and_dtype():
    spec = TensorSpec("input_ids", (1, "seq"), "int64")
    spec.check(torch.zeros(1, 5, dtype=torch.int64))
    with pytest.raises(InputSpecError, match="expected dtype int64, got float32"):
        spec.check(torch.zeros(1, 5))
    with pytest.raises(InputSpecError, match=r"expected shape \[1, 'seq'\], got \[2, 5\]"):
        spec.check(torch.zeros(2, 5, dtype=torch.int64))


@pytest.mark.parametrize("bad", [-1, 1 << 20])
def test_token_ids_outside_the_vocabulary_are_one_line_errors(tmp_path, bad):
    """ONNX Gather wraps negative ids and errors deep inside on large ones: the input's
    valid range comes from the embedding table and is checked in process and in artifacts."""
    bundle = graphopt.models.load("llama")
    (ids,) = small_inputs(bundle)
    vocab = bundle.model.config.vocab_size
    cm = graphopt.compile(bundle.model, (ids,), passes="none", progress=False)
    assert cm.captured.inputs[0].index_range == (0, vocab)
    loaded = graphopt.load(cm.save(str(tmp_path / "llama")))
    wrong = ids.clone()
    wrong[0, -1] = bad
    message = f"input 'input_ids': value {bad} is out of range; valid values are 0..{vocab - 1}"
    for run in (cm, loaded):
        with pytest.raises(InputSpecError, match=message.replace("(", r"\(").replace(")", r"\)")):
            run(wrong if run is cm else wrong.numpy())
    loaded(ids.numpy())


def test_more_tokens_than_the_model_has_positions_fail_before_capture():
    bundle = graphopt.models.load("llama")
    limit = bundle.model.config.max_position_embeddings
    with pytest.raises(GraphoptError, match=f"outside this model's positions \\(1..{limit}\\)"):
        bundle.example_inputs(seq_len=limit + 1)
    with pytest.raises(CaptureError, match=f"{limit + 1} tokens, more than the model's {limit} positions"):
        capture(bundle.model, (torch.zeros(1, limit + 1, dtype=torch.long),))
