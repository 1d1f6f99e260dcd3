"""Text generation on the TVM backend: graphopt.kv_attention as one in-place call of
kernels/kv_attention.c. The kernel equals the op's torch reference (every cache capacity, GQA
grouping, head size, prompt and decode, with and without rotary tables, AVX-512 and AVX2
builds); artifacts generate Hugging Face's greedy tokens, write the cache in place, run where
torch cannot be imported, and int4 artifacts track their torch graph."""
import ctypes
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import graphopt
from graphopt.backends.tvm.dense_kernels import F32_KERNELS, KERNELS as DENSE_KERNELS, build_kernel_objects
from graphopt.backends.tvm.runner import cpu_flags
from graphopt.errors import BackendError, GraphoptError
from graphopt.generation import generator_for
from graphopt.ir.kv_attention import kv_attention

from ..test_generation import causal_lm, generated_where_torch_cannot_be_imported, hf_greedy, tokens_of

pytest.importorskip("tvm")

KERNELS = [kernel for kernel in F32_KERNELS if set(F32_KERNELS[kernel][1]) <= (cpu_flags() or set())]
BF16_KERNELS = [name for name, (precision, needs, _, _) in DENSE_KERNELS.items()
                if precision == "bf16" and set(needs) <= (cpu_flags() or set())]
INT8_KERNELS = [name for name, (precision, needs, _, _) in DENSE_KERNELS.items()
                if precision == "int8" and set(needs) <= (cpu_flags() or set())]


@pytest.fixture(scope="module", params=KERNELS)
def kernel_library(request, tmp_path_factory):
    """The float32 kernels of one build as a shared library (ctypes)."""
    directory = tmp_path_factory.mktemp(request.param)
    objects = build_kernel_objects(request.param, str(directory))
    library = str(directory / "kernels.so")
    subprocess.run(["cc", "-shared", *objects, "-o", library, "-lm"], check=True)
    lib = ctypes.CDLL(library)
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    lib.graphopt_kv_write.argtypes = [pointer] * 8 + [size] * 9
    lib.graphopt_kv_attend.argtypes = [pointer] * 8 + [size] * 6 + [ctypes.c_float] + [size] * 4
    return lib


def kernel_kv_attention(lib, q, k, v, key_cache, value_cache, seqlens_k, total, tables, heads, kv_heads, scale,
                        tasks=3):
    """The two kernel calls on numpy arrays (caches in the graph's layout; the key cache is
    transposed for the kernel and back): (out, key cache, value cache)."""
    batch, seq, _ = q.shape
    capacity, depth = key_cache.shape[2:]
    keys = np.ascontiguousarray(key_cache.transpose(0, 1, 3, 2))
    values = np.ascontiguousarray(value_cache)
    out = np.zeros_like(q)
    cos, sin = tables if tables is not None else (np.zeros((1, 1), np.float32),) * 2
    total = np.array(total, np.int32)

    def p(a):
        return a.ctypes.data_as(ctypes.c_void_p)
    common = [p(seqlens_k), p(total), p(cos), p(sin)]
    for task in range(tasks):
        lib.graphopt_kv_write(p(k), p(v), p(keys), p(values), *common, batch, seq, kv_heads, capacity, depth,
                              int(tables is not None), cos.shape[0], task, tasks)
    for task in range(tasks):
        lib.graphopt_kv_attend(p(q), p(keys), p(values), *common, p(out), batch, seq, heads, kv_heads, capacity,
                               depth, scale, int(tables is not None), cos.shape[0], task, tasks)
    return out, keys.transpose(0, 1, 3, 2), values


# batch, tokens, heads, kv heads, head size, capacity, cache length before the call (None: a prompt), rotary
CASES = [(1, 1, 9, 3, 64, 1040, 100, True), (2, 1, 4, 2, 32, 37, 20, True), (1, 40, 9, 3, 64, 64, None, True),
         (3, 19, 6, 2, 16, 33, None, False), (2, 1, 8, 8, 64, 1024, 1000, True), (1, 3, 4, 1, 128, 50, 10, True),
         (2, 5, 4, 2, 64, 17, 12, False), (1, 1, 2, 1, 16, 16, 15, True)]


@pytest.mark.parametrize("batch,seq,heads,kv_heads,depth,capacity,past,rotary", CASES)
def test_the_kernel_equals_the_reference_op(kernel_library, batch, seq, heads, kv_heads, depth, capacity, past,
                                            rotary):
    rng = np.random.default_rng(seq * 100 + capacity)

    def normal(*shape):
        return rng.standard_normal(shape).astype(np.float32)
    q = normal(batch, seq, heads * depth)
    k, v = normal(batch, seq, kv_heads * depth), normal(batch, seq, kv_heads * depth)
    key_cache, value_cache = normal(batch, kv_heads, capacity, depth), normal(batch, kv_heads, capacity, depth)
    if past is None:
        seqlens_k, total = np.full(batch, seq - 1, np.int32), seq
    else:       # rows of different lengths
        seqlens_k = np.array([past + seq - 1 - 3 * b for b in range(batch)], np.int32)
        total = int(seqlens_k.max()) + 1
    tables = None
    if rotary:
        angles = np.arange(2048)[:, None] * 10000.0 ** (-np.arange(depth // 2) / (depth // 2))[None]
        tables = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
    scale = depth ** -0.5
    ours = kernel_kv_attention(kernel_library, q, k, v, key_cache, value_cache, seqlens_k, total, tables, heads,
                               kv_heads, scale)
    t = torch.from_numpy
    reference = kv_attention(t(q), t(k), t(v), t(key_cache), t(value_cache), t(seqlens_k),
                             torch.tensor(total, dtype=torch.int32), heads, kv_heads, scale,
                             *(t(table) for table in tables or ()))
    for got, want in zip(ours, reference):
        assert np.abs(got - want.numpy()).max() <= 2e-6 * max(1.0, np.abs(want.numpy()).max())


@pytest.fixture(scope="module")
def llama_tvm(tmp_path_factory):
    model = causal_lm("llama")
    from ..test_generation import byte_tokenizer
    cm = graphopt.compile(model, task="text-generation", tokenizer=byte_tokenizer(model.config.vocab_size),
                          backend="tvm", progress=False)
    path = str(tmp_path_factory.mktemp("gen-tvm") / "llama")
    cm.save(path)
    return model, cm, path


@pytest.mark.parametrize("name", ["llama", pytest.param("qwen2", marks=pytest.mark.slow),
                                  pytest.param("mistral", marks=pytest.mark.slow)])
def test_greedy_equals_hugging_face_generate_for_a_batch_of_prompt_lengths(name, llama_tvm, tmp_path):
    if name == "llama":
        model, _, path = llama_tvm
    else:
        model, path = causal_lm(name), str(tmp_path / name)
        graphopt.compile(model, task="text-generation", backend="tvm", progress=False).save(path)
    lm = graphopt.load(path)
    generator = generator_for(lm.directory, lm.manifest, lm.runner)
    rng = np.random.default_rng(0)
    rows = [rng.integers(3, model.config.vocab_size, n).tolist() for n in (9, 2, 14)]
    for row, got in zip(rows, tokens_of(generator, rows, 24)):
        assert got == hf_greedy(model, row, 24)


def test_prompt_logits_equal_eager_at_every_position(llama_tvm):
    model, cm, _ = llama_tvm
    generator = generator_for("(mem)", {"task": cm.task, "backend": cm.backend}, cm.executable.runner, cm.extra_files)
    ids = torch.randint(0, model.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        eager = model(input_ids=ids).logits.numpy()
    assert np.abs(generator.next_token_logits(ids.numpy()) - eager).max() <= 1e-5 * np.abs(eager).max()


def test_the_cache_is_written_in_place_keys_transposed(llama_tvm):
    _, cm, _ = llama_tvm
    generator = generator_for("(mem)", {"task": cm.task, "backend": cm.backend}, cm.executable.runner, cm.extra_files)
    steps = generator.generate_tokens([[5, 6, 7]], 3, capacity=8)
    next(steps)                                          # the prompt ran
    buffer = generator.steps.buffers[0]
    keys = np.from_dlpack(buffer)                        # layer 0 keys: a view of the buffer the library writes
    assert keys.shape[2] == 16                           # capacity 8 rounded up to the kernel's 16-key tiles
    by_position = keys.reshape(keys.shape[0], keys.shape[1], keys.shape[3], 16)   # [b, kv heads, head dim, capacity]
    assert np.abs(by_position[0, :, :, :3]).max(axis=1).min() > 0 and not by_position[0, :, :, 3:].any()
    next(steps)                                          # one decode step: position 3, in the same memory
    assert by_position[0, :, :, 3].any() and not by_position[0, :, :, 4:].any()
    assert generator.steps.buffers[0] is buffer


def test_generation_runs_where_torch_cannot_be_imported(llama_tvm):
    _, _, path = llama_tvm
    expected = graphopt.load(path).generate("hello", max_new_tokens=10)
    assert generated_where_torch_cannot_be_imported(path, "hello", 10) == expected


def test_the_rotary_tables_are_stored_as_their_recipe(llama_tvm):
    model, _, path = llama_tvm
    import json

    import tvm
    derived = json.load(open(f"{path}/manifest.json"))["backend_options"]["derived_params"]
    assert sorted(recipe["kind"] for recipe in derived.values()) == ["rotary_cos", "rotary_sin"]
    stored = tvm.runtime.load_param_dict_from_file(f"{path}/params.bin")
    assert not set(derived) & set(stored)
    from graphopt.backends.tvm.runner import derived_param
    from graphopt.frontend.generation import rotary_tables
    for recipe, table in zip(sorted(derived.values(), key=lambda r: r["kind"]),
                             rotary_tables(model.get_decoder(), model.config.max_position_embeddings)):
        assert np.abs(derived_param(recipe) - table.numpy()).max() <= 1e-6      # the model's own tables


def test_loading_a_tvm_artifact_leaves_torch_unimported(llama_tvm):
    _, _, path = llama_tvm          # tvm_ffi would import torch where it is installed: +250 MB
    script = textwrap.dedent(f"""
        import sys
        import graphopt
        graphopt.load({path!r}).generate("hello", max_new_tokens=2)
        assert "torch" not in sys.modules, "torch was imported"
        import torch                   # and torch still imports afterwards
        assert torch.ones(2).sum() == 2
    """)
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, timeout=180)


@pytest.mark.skipif(not BF16_KERNELS, reason="int4 on TVM needs a bf16 kernel (AVX512-BF16 or AMX)")
def test_int4_artifact_tracks_its_torch_graph_in_prompt_and_decode():
    model = causal_lm("llama")
    cm = graphopt.compile(model, task="text-generation", passes="int4", backend="tvm", progress=False)
    generator = generator_for("(mem)", {"task": cm.task, "backend": cm.backend}, cm.executable.runner, cm.extra_files)
    ids = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(1))
    from graphopt.frontend.generation import prompt_inputs
    with torch.no_grad():
        reference = cm.captured.graph_module(*prompt_inputs(model.config, ids))[0].numpy()
    # a 12-token prompt runs the bf16 kernel (activations rounded to bf16): ~1e-2 of scale
    assert np.abs(generator.next_token_logits(ids.numpy()) - reference).max() <= 2e-2 * np.abs(reference).max()
    # decode steps read the int4 codes in float32: the greedy tokens of the torch graph
    rows, tokens = [ids[0].tolist()], []
    for step in generator.generate_tokens(rows, 6):
        tokens.append(step[0])
    sequence = ids[0].tolist()
    for _ in range(6):
        inputs = prompt_inputs(model.config, torch.tensor([sequence]))
        with torch.no_grad():
            sequence.append(int(cm.captured.graph_module(*inputs)[0][0, -1].argmax()))
    assert tokens == sequence[12:]


@pytest.mark.skipif(not INT8_KERNELS, reason="int8 on TVM needs AMX-INT8, AVX512-VNNI or AVX2")
def test_int8_generation_learns_its_smoothing_from_the_token_windows():
    model = causal_lm("llama")
    windows = [torch.randint(3, 512, (1, 32), generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    cm = graphopt.compile(model, task="text-generation", backend="tvm", calibration=windows, progress=False,
                          backend_options={"precision": "int8"})
    assert "learnt from 3 batch(es)" in cm.records[-1].notes[0]       # the example inputs and both windows
    assert cm.records[-1].quality["top1_agreement"] > 0.9
    generator = generator_for("(mem)", {"task": cm.task, "backend": cm.backend}, cm.executable.runner, cm.extra_files)
    ids = torch.randint(0, 512, (2, 17), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        eager = model(input_ids=ids).logits.numpy()
    # int8 activations and weights: ~1e-2 of scale (fp32 would be 1e-6)
    error = np.abs(generator.next_token_logits(ids.numpy()) - eager).max() / np.abs(eager).max()
    assert 1e-4 < error <= 3e-2


def test_refusals_are_one_line_errors():
    model = causal_lm("llama")
    with pytest.raises(GraphoptError, match="float32 cache"):
        graphopt.compile(model, task="text-generation", backend="tvm", cache_dtype="float16", progress=False)
    with pytest.raises(BackendError, match=r"graphopt.kv_attention\) needs graphopt's float32 kernels") as info:
        graphopt.compile(model, task="text-generation", backend="tvm", backend_options={"target": "x86-64-v2"},
                         progress=False)
    assert "\n" not in str(info.value)
