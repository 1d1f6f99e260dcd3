"""Text generation artifacts: greedy equality with Hugging Face generate, batches of prompts
of different lengths, the in-place cache, streaming, sampling, stop strings, bad input, and
generation where torch cannot be imported."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import graphopt
from graphopt.errors import ArtifactError, GraphoptError
from graphopt.generation import Sampler

MODELS = ["llama", "mixtral", pytest.param("qwen2", marks=pytest.mark.slow),
          pytest.param("mistral", marks=pytest.mark.slow), pytest.param("qwen3_moe", marks=pytest.mark.slow)]


def byte_tokenizer(vocab_size: int):
    """A byte-level tokenizer of `vocab_size` ids: 256 bytes, then special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast
    alphabet = ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([f"<s{i}>" for i in range(vocab_size - len(vocab))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<s0>", bos_token="<s1>")


def causal_lm(name: str):
    model = graphopt.models.load(name).model
    model.config.use_cache = True
    model.generation_config.eos_token_id = None     # random weights: run to max_new_tokens
    model.config.eos_token_id = None
    return model


@pytest.fixture(scope="module")
def llama_artifact(tmp_path_factory):
    model = causal_lm("llama")
    tokenizer = byte_tokenizer(model.config.vocab_size)
    cm = graphopt.compile(model, task="text-generation", tokenizer=tokenizer, progress=False)
    path = str(tmp_path_factory.mktemp("gen") / "llama")
    cm.save(path)
    return model, tokenizer, cm, path


def hf_greedy(model, ids: list[int], new_tokens: int) -> list[int]:
    out = model.generate(torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False,
                         attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    return out[0, len(ids):].tolist()


def tokens_of(generator, rows, new_tokens):
    out = [[] for _ in rows]
    for step in generator.generate_tokens(rows, new_tokens):
        for row, token in step.items():
            out[row].append(token)
    return out


@pytest.mark.parametrize("name", MODELS)
def test_greedy_equals_hugging_face_generate_for_a_batch_of_prompt_lengths(name, tmp_path):
    model = causal_lm(name)
    cm = graphopt.compile(model, task="text-generation", progress=False)
    cm.save(str(tmp_path / name))
    lm = graphopt.load(str(tmp_path / name))
    from graphopt.generation import generator_for
    generator = generator_for(lm.directory, lm.manifest, lm.runner)
    rng = np.random.default_rng(0)
    rows = [rng.integers(3, model.config.vocab_size, n).tolist() for n in (9, 2, 14)]
    ours = tokens_of(generator, rows, 24)
    for row, got in zip(rows, ours):
        assert got == hf_greedy(model, row, 24)


@pytest.mark.slow
def test_qwen3_keeps_its_own_rotary_after_the_q_k_norms(tmp_path):
    import transformers
    config = transformers.Qwen3Config(hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
                                      num_key_value_heads=2, head_dim=16, vocab_size=512, max_position_embeddings=512)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    model.generation_config.eos_token_id = None
    cm = graphopt.compile(model, task="text-generation", progress=False)
    from graphopt.generation import generator_for
    generator = generator_for("(mem)", {"task": cm.task, "backend": cm.backend}, cm.executable.runner, cm.extra_files)
    rows = [[5, 9, 100, 7, 3], [42, 17]]
    for row, got in zip(rows, tokens_of(generator, rows, 16)):
        assert got == hf_greedy(model, row, 16)


def test_prompt_logits_equal_eager_at_every_position(llama_artifact):
    model, _, cm, _ = llama_artifact
    from graphopt.generation import generator_for
    generator = generator_for("(mem)", {"task": cm.task, "backend": cm.backend}, cm.executable.runner, cm.extra_files)
    ids = torch.randint(0, model.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(3))
    ours = generator.next_token_logits(ids.numpy())
    with torch.no_grad():
        eager = model(input_ids=ids).logits.numpy()
    assert np.abs(ours - eager).max() <= 1e-5 * np.abs(eager).max()


def test_the_cache_is_written_in_place_in_the_bound_buffers(llama_artifact):
    model, _, _, path = llama_artifact
    lm = graphopt.load(path)
    lm.generate("ab", max_new_tokens=1)
    generator = lm._generator
    steps = generator.generate_tokens([[5, 6, 7]], 3, capacity=8)
    next(steps)                                          # the prompt ran
    key = generator.steps.buffers[0].numpy()             # layer 0 keys, the numpy view of the bound memory
    assert np.abs(key[0, :, :3]).min(axis=-1).max() > 0 and not key[0, :, 3:].any()
    next(steps)                                          # one decode step: position 3 is written in place
    assert key[0, :, 3].any() and not key[0, :, 4:].any()
    assert generator.steps.buffers[0].data_ptr() == key.ctypes.data


def test_text_stream_concatenates_to_the_text_and_stop_strings_end_it(llama_artifact):
    _, tokenizer, _, path = llama_artifact
    lm = graphopt.load(path)
    text = lm.generate("hello world", max_new_tokens=30)
    pieces = list(lm.generate("hello world", max_new_tokens=30, stream=True))
    assert "".join(pieces) == text and len(pieces) > 1
    ids = tokens_of(lm._generator, [lm._generator.encode("hello world")], 30)[0]
    assert text == tokenizer.decode(ids, skip_special_tokens=True)
    if len(text) > 4:
        stop = text[2:4]
        cut = lm.generate("hello world", max_new_tokens=30, stop=stop)
        assert cut == text[:text.find(stop)]
        assert "".join(lm.generate("hello world", max_new_tokens=30, stop=stop, stream=True)) == cut
    assert lm.generate("hello world", max_new_tokens=5, stop="never appears \u2603") == \
        lm.generate("hello world", max_new_tokens=5)


def test_sampling_is_reproducible_by_seed_and_respects_top_k():
    logits = np.random.default_rng(0).standard_normal((4, 50))
    a = [Sampler(1.0, top_k=5, seed=7)(logits) for _ in range(3)]
    b = [Sampler(1.0, top_k=5, seed=7)(logits) for _ in range(3)]
    assert all((x == y).all() for x, y in zip(a, b))
    top5 = np.argsort(-logits, -1)[:, :5]
    draws = Sampler(1.0, top_k=5, seed=1)
    for _ in range(50):
        assert all(t in row for t, row in zip(draws(logits), top5))
    nucleus = Sampler(1.0, top_p=1e-9, seed=1)
    assert (nucleus(logits) == logits.argmax(-1)).all()
    assert (Sampler()(logits) == logits.argmax(-1)).all()


def test_batch_generation_returns_one_text_per_prompt(llama_artifact):
    _, _, _, path = llama_artifact
    lm = graphopt.load(path)
    texts = lm.generate(["a", "a longer prompt", "mid one"], max_new_tokens=12)
    assert texts == [lm.generate(p, max_new_tokens=12) for p in ["a", "a longer prompt", "mid one"]]


@pytest.mark.parametrize("call, message", [
    (lambda lm: lm.generate("", max_new_tokens=4), "the prompt is empty"),
    (lambda lm: lm.generate("hi", max_new_tokens=0), "max_new_tokens must be a positive int"),
    (lambda lm: lm.generate("x" * 600, max_new_tokens=4), "this model has 512 positions"),
    (lambda lm: lm.generate("hi", temperature=-1), "temperature must be >= 0"),
    (lambda lm: lm.generate("hi", top_p=0), r"top_p must be in \(0, 1\]"),
    (lambda lm: lm.generate(["a", "b"], stream=True), "stream=True takes one prompt"),
    (lambda lm: lm.generate("hi", chat=True), "no chat template"),
    (lambda lm: lm.generate("hi", stop=""), "stop strings must be non-empty"),
])
def test_bad_generation_input_is_a_one_line_error(llama_artifact, call, message):
    lm = graphopt.load(llama_artifact[3])
    with pytest.raises(GraphoptError, match=message) as info:
        call(lm)
    assert "\n" not in str(info.value)


def test_a_forward_pass_artifact_cannot_generate(tmp_path):
    model = graphopt.models.load("llama").model
    ids = torch.randint(0, 512, (1, 8))
    graphopt.compile(model, (ids,), progress=False).save(str(tmp_path / "fwd"))
    with pytest.raises(ArtifactError, match="not a text-generation artifact"):
        graphopt.load(str(tmp_path / "fwd")).generate("hi")


def test_unsupported_architectures_and_backends_are_refused():
    with pytest.raises(GraphoptError, match="text generation supports llama"):
        graphopt.compile(graphopt.models.load("gpt2").model, task="text-generation", progress=False)
    with pytest.raises(GraphoptError, match="lowers to onnxruntime and tvm"):
        graphopt.compile(causal_lm("llama"), task="text-generation", backend="openvino", progress=False)


def generated_where_torch_cannot_be_imported(path: str, prompt: str, new_tokens: int) -> str:
    """The artifact's greedy text, generated in a subprocess where `import torch` fails (and
    checked to have loaded neither torch nor transformers)."""
    script = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None            # any `import torch` now raises ImportError
        import graphopt
        text = graphopt.load({path!r}).generate({prompt!r}, max_new_tokens={new_tokens})
        assert not [m for m in sys.modules if m.split(".")[0] in ("torch", "transformers") and sys.modules[m]]
        sys.stdout.write(text)
    """)
    return subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, timeout=180,
                          text=True).stdout


def test_generation_runs_where_torch_cannot_be_imported(llama_artifact):
    _, _, _, path = llama_artifact
    expected = graphopt.load(path).generate("hello", max_new_tokens=10)
    assert generated_where_torch_cannot_be_imported(path, "hello", 10) == expected


def test_int4_offset_grid_artifact_tracks_the_torch_reference(tmp_path):
    model = causal_lm("qwen2")
    cm = graphopt.compile(model, task="text-generation", passes="int4", progress=False)
    from graphopt.generation import generator_for
    generator = generator_for("(mem)", {"task": cm.task, "backend": cm.backend}, cm.executable.runner, cm.extra_files)
    ids = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(1))
    from graphopt.frontend.generation import prompt_inputs
    with torch.no_grad():
        reference = cm.captured.graph_module(*prompt_inputs(model.config, ids))[0].numpy()
    ours = generator.next_token_logits(ids.numpy())
    # MatMulNBits quantizes activations to int8 per block (accuracy level 4): ~1e-2 of scale
    assert np.abs(ours - reference).max() <= 3e-2 * np.abs(reference).max()
    ops = {n.target for n in cm.captured.graph_module.graph.nodes if n.op == "call_function"}
    assert torch.ops.graphopt.matmul_nbits.default in ops


def test_float16_cache_artifact_equals_its_torch_reference_in_prompt_and_decode(tmp_path):
    model = causal_lm("llama")
    cm = graphopt.compile(model, task="text-generation", cache_dtype="float16", progress=False)
    cm.save(str(tmp_path / "fp16-cache"))
    lm = graphopt.load(str(tmp_path / "fp16-cache"))
    assert lm.manifest["task"]["cache_dtype"] == "float16"
    from graphopt.frontend.generation import prompt_inputs
    from graphopt.generation import generator_for
    generator = generator_for(lm.directory, lm.manifest, lm.runner)
    ids = torch.randint(3, 512, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference = cm.captured.graph_module(*prompt_inputs(model.config, ids, dtype=torch.float16))[0].numpy()
        fp32 = model(input_ids=ids).logits.numpy()
    ours = generator.next_token_logits(ids.numpy())
    scale = np.abs(reference).max()
    assert np.abs(ours - reference).max() <= 1e-4 * scale          # measured 1.5e-5
    assert 1e-5 * scale < np.abs(ours - fp32).max() <= 2e-3 * scale   # the float16 cache's cost (2.3e-4), visible
    steps = generator.generate_tokens([ids[0].tolist()], 4, capacity=20)
    next(steps)
    assert generator.steps.buffers[0].numpy().dtype == np.float16      # the bound buffers are half-size
    rows = [ids[0].tolist()]
    assert tokens_of(generator, rows, 12)[0][:4] == hf_greedy(model, rows[0], 12)[:4]
    with pytest.raises(GraphoptError, match="cache_dtype must be one of float32, float16"):
        graphopt.compile(model, task="text-generation", cache_dtype="int8", progress=False)
    with pytest.raises(GraphoptError, match="for task='text-generation'"):
        graphopt.compile(model, (ids,), cache_dtype="float16", progress=False)


def test_layer_skipping_applies_and_head_pruning_refuses_generation_graphs():
    from graphopt.passes import AttentionHeadPruning, preset
    from graphopt.passes.layer_skipping import LayerSkipping
    model = causal_lm("llama")
    calibration = [torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(s)) for s in range(3)]
    passes = preset("default")
    passes.insert(1, LayerSkipping(method="finercut", sublayers=2))
    cm = graphopt.compile(model, task="text-generation", passes=passes, calibration=calibration, progress=False)
    record = [r for r in cm.records if r.name == "layer_skipping"][0]
    assert record.modified and sum("removed" in c for c in record.changes) == 2 and record.quality is not None
    with pytest.raises(GraphoptError, match="cached attention, which head pruning does not handle"):
        graphopt.compile(model, task="text-generation", passes=[AttentionHeadPruning(ratio=0.5)],
                         calibration=calibration, progress=False)
