"""The TVM backend: every family compiles and matches eager, artifacts run without torch,
our schedules compute what they claim, and unsupported ops are named."""
import numpy as np
import pytest
import torch

import graphopt
from graphopt.frontend.torch_export import sequence_dims

from ..conftest import assert_close_to_scale, eager_outputs, run_artifact_without_torch, small_inputs

tvm = pytest.importorskip("tvm")


@pytest.mark.parametrize(
    "name", ["llama", "qwen2", "gpt2", "bert", "falcon", "gptj", "phi3", "gemma2", "resnet", "densenet"]
)
@pytest.mark.parametrize("preset", ["default", "none"])
def test_families_match_eager(name, preset):
    bundle = graphopt.models.load(name)
    inputs = small_inputs(bundle)
    cm = graphopt.compile(bundle.model, inputs, passes=preset, backend="tvm", progress=False)
    outs = cm(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    for got, want in zip(outs, eager_outputs(bundle.model, inputs), strict=True):
        assert_close_to_scale(got, want, 1e-4)


@pytest.mark.parametrize("name", ["vit", "swin", "mobilenetv2", "mobilevit"])
def test_vision_models_match_eager(name):
    bundle = graphopt.models.load(name)
    inputs = small_inputs(bundle)
    cm = graphopt.compile(bundle.model, inputs, backend="tvm", progress=False)
    outs = cm(*inputs)
    for got, want in zip(
        outs if isinstance(outs, tuple) else (outs,), eager_outputs(bundle.model, inputs), strict=True
    ):
        assert_close_to_scale(got, want, 1e-4)


def test_dynamic_dimension_and_its_limit():
    bundle = graphopt.models.load("resnet")
    inputs = bundle.example_inputs(batch=2)
    cm = graphopt.compile(bundle.model, inputs, dynamic_dims={0: {0: "batch"}}, backend="tvm", progress=False)
    for batch in (1, 3):
        other = bundle.example_inputs(batch=batch, seed=batch)
        assert_close_to_scale(cm(*other), eager_outputs(bundle.model, other)[0], 1e-4)
    # TVM's shape inference does not follow Hugging Face's mask code over a dynamic sequence
    # (after two rewrites it stops at a prim.if_then_else in a shape): a one-line error says so.
    llama = graphopt.models.load("llama")
    tokens = llama.example_inputs(seq_len=16)
    with pytest.raises(graphopt.BackendError, match="failed with dynamic dimensions .* compile with static shapes"):
        graphopt.compile(llama.model, tokens, dynamic_dims=sequence_dims(tokens), backend="tvm", progress=False)


def test_artifact_runs_without_torch(tmp_path):
    bundle = graphopt.models.load("gpt2")
    inputs = small_inputs(bundle)
    cm = graphopt.compile(bundle.model, inputs, backend="tvm", progress=False)
    path = cm.save(str(tmp_path / "gpt2-tvm"))
    loaded = graphopt.load(path)
    assert loaded.manifest["backend"] == "tvm"
    assert set(loaded.manifest["files"]) == {"model.so", "params.bin"}
    assert loaded.manifest["backend_options"]["compile_seconds"] > 0
    want = cm(*inputs).numpy()
    np.testing.assert_array_equal(loaded(*inputs).numpy(), want)
    np.testing.assert_array_equal(run_artifact_without_torch(path, inputs), want)


@pytest.mark.parametrize("rows", [1, 7, 128, "dynamic"])
def test_packed_dense_matches_numpy(rows):
    from graphopt.backends.tvm.runner import host_target
    from graphopt.backends.tvm.schedules import packed_dense
    k, n, lanes = 96, 64, 32
    symbolic = rows == "dynamic"
    rows = 37 if symbolic else rows
    rng = np.random.default_rng(rows)
    x = rng.standard_normal((rows, k), dtype=np.float32)
    w = rng.standard_normal((n, k), dtype=np.float32)
    panels = np.ascontiguousarray(w.reshape(n // lanes, lanes, k).transpose(0, 2, 1))
    func = packed_dense(tvm.tirx.Var("m", "int64") if symbolic else rows, k, n, lanes)
    kernel = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}),
                         target=tvm.target.Target(host_target()))
    out = tvm.runtime.tensor(np.zeros((rows, n), np.float32))
    kernel["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(panels), out)
    np.testing.assert_allclose(out.numpy(), x @ w.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("preset, per_layer", [("none", 7), ("fuse", 4)])
def test_every_weight_matmul_is_packed(preset, per_layer):
    """q, k, v, o, gate, up, down (fused: qkv, o, gate_up, down) per layer and the LM head,
    including the weights a pass made; attention's two matmuls per layer stay Relax matmuls."""
    from graphopt.backends.tvm import import_relax
    from graphopt.backends.tvm.pipeline import PackDenseWeights
    bundle = graphopt.models.load("llama")
    cm = graphopt.compile(bundle.model, small_inputs(bundle), passes=preset, backend="torch", progress=False)
    mod, params = import_relax(cm.captured)
    text = PackDenseWeights()(mod)["main"].script()
    layers = bundle.model.config.num_hidden_layers
    assert text.count("packed_dense_") == per_layer * layers + 1
    assert text.count("R.matmul(") == 2 * layers
    assert "R.permute_dims(metadata" not in text      # no weight matrix was bound as a constant


def test_unsupported_op_names_op_and_node():
    class Unsupported(torch.nn.Module):
        def forward(self, x):
            return torch.special.zeta(x, 2.0)

    with pytest.raises(graphopt.UnsupportedOpError, match=r"tvm backend: no Relax conversion for op "
                                                           r"'special_zeta\.\w+' \(node '\w+'\)") as info:
        graphopt.compile(Unsupported(), (torch.rand(4) + 1,), backend="tvm", progress=False)
    assert "\n" not in str(info.value)


def test_output_width_not_a_multiple_of_16_is_padded_and_sliced():
    """GPT-2's 50257-token head: panels padded with zeros, the extra columns sliced off."""
    model = torch.nn.Sequential(torch.nn.Linear(40, 50), torch.nn.GELU(), torch.nn.Linear(50, 37)).eval()
    x = torch.randn(3, 5, 40)
    cm = graphopt.compile(model, (x,), backend="tvm", progress=False)
    assert_close_to_scale(cm(x), model(x).detach(), 1e-5)
    from graphopt.backends.tvm import import_relax
    from graphopt.backends.tvm.pipeline import PackDenseWeights
    text = PackDenseWeights()(import_relax(cm.captured)[0])["main"].script()
    assert "packed_dense_40x64" in text and "packed_dense_50x64" in text and text.count("R.strided_slice") == 2


def test_avx2_targets_get_panels_of_two_registers():
    """A 6-row tile of 32-lane panels fills 24 AVX2 registers (16 exist): an AVX2 target packs
    16-lane panels (GPT-2's padded 50 -> 64 columns too), AVX-512 keeps 32; both exact."""
    from graphopt.backends.tvm import import_relax
    from graphopt.backends.tvm.pipeline import PackDenseWeights
    from graphopt.backends.tvm.schedules import panel_lanes
    assert panel_lanes({"avx2", "fma"}) == 16 and panel_lanes({"avx2", "avx512f"}) == 32 and panel_lanes(None) == 16
    model = torch.nn.Sequential(torch.nn.Linear(40, 96), torch.nn.GELU(), torch.nn.Linear(96, 50)).eval()
    x = torch.randn(3, 5, 40)
    cm = graphopt.compile(model, (x,), backend="tvm", backend_options={"target": "x86-64-v3"}, progress=False)
    assert_close_to_scale(cm(x), model(x).detach(), 1e-5)
    mod = import_relax(cm.captured)[0]
    narrow, wide = (PackDenseWeights(widest=widest)(mod)["main"].script() for widest in (16, 32))
    assert "(6, 16, 40)" in narrow and "(4, 16, 96)" in narrow         # 96 and 50 (-> 64) columns in 16s
    assert "(3, 32, 40)" in wide and "(2, 32, 96)" in wide


def test_tied_embedding_reads_the_packed_lm_head():
    """GPT-2 ties its token embedding to the LM head: the lookup reads rows from the packed
    panels, so the artifact holds that weight once."""
    from graphopt.backends.tvm import import_relax
    from graphopt.backends.tvm.pipeline import PackDenseWeights
    bundle = graphopt.models.load("gpt2")
    assert bundle.model.config.tie_word_embeddings
    cm = graphopt.compile(bundle.model, small_inputs(bundle), backend="tvm", progress=False)
    assert_close_to_scale(cm(*small_inputs(bundle)), eager_outputs(bundle.model, small_inputs(bundle))[0], 1e-4)
    mod = tvm.relax.transform.LiftTransformParams()(PackDenseWeights()(import_relax(cm.captured)[0]))
    main = mod["main"].script()
    assert "embedding_rows" in main and "R.take(p_model_lm_head_weight" not in main
    vocab, hidden = bundle.model.config.vocab_size, bundle.model.config.n_embd
    shapes = [tuple(int(d) for d in p.ty.shape.values) for p in mod["main"].params[1:]]
    assert (vocab, hidden) not in shapes      # only the panels of the tied weight remain


def test_loading_on_a_cpu_without_the_library_features_refuses(tmp_path):
    import json

    from graphopt.errors import ArtifactError
    bundle = graphopt.models.load("resnet")
    path = graphopt.compile(bundle.model, small_inputs(bundle), backend="tvm", progress=False).save(str(tmp_path / "r"))
    manifest_path = tmp_path / "r" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["backend_options"]["target"]["mcpu"] = "some-other-cpu"
    manifest["backend_options"]["cpu_features"].append("no_such_cpu_flag")
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="built for CPU 'some-other-cpu'.*lacks: no_such_cpu_flag"):
        graphopt.load(path)
    del manifest["backend_options"]["cpu_features"]
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="does not say which CPU features"):
        graphopt.load(path)


@pytest.mark.parametrize("name", ["resnet", "densenet", "llama"])
def test_pruned_graphs_lower_and_match_the_torch_backend(name):
    """Channel pruning leaves slices and gathers (index_select) in the graph, head pruning
    narrower attentions: TVM runs both and matches the pruned graph run by torch."""
    from graphopt.passes import AttentionHeadPruning, ChannelPruning, DeadCodeElimination
    bundle = graphopt.models.load(name)
    inputs = small_inputs(bundle)
    pruning = [ChannelPruning(ratio=0.5, reorder=True)]
    if name == "llama":
        pruning.append(AttentionHeadPruning(ratio=0.5, importance="l2"))
    passes = [*pruning, DeadCodeElimination()]
    reference = graphopt.compile(bundle.model, inputs, passes=passes, backend="torch", progress=False)
    ops = {str(n.target) for n in reference.graph_module.graph.nodes}
    assert {"aten.index_select.default", "aten.slice.Tensor"} & ops
    cm = graphopt.compile(bundle.model, inputs, passes=passes, backend="tvm", progress=False)
    assert cm.stats["parameter_bytes_optimized"] < cm.stats["parameter_bytes_captured"]
    assert_close_to_scale(cm(*inputs), reference(*inputs), 1e-4)


class _NegativeIndices(torch.nn.Module):
    """Constant and computed negative indices, as torch wraps them."""

    def forward(self, x, positions):
        picked = x[:, [-1, 0, -3]]                        # a constant index tensor
        computed = x[:, positions - 4]                     # computed at run time, some negative
        return picked, computed


@pytest.mark.parametrize("preset", ["none", "default"])   # default folds the constant index
def test_negative_indices_are_wrapped_not_read_out_of_bounds(preset):
    x = torch.randn(2, 6, 5, generator=torch.Generator().manual_seed(0))
    positions = torch.tensor([0, 3, 5, 1])
    model = _NegativeIndices().eval()
    cm = graphopt.compile(model, (x, positions), passes=preset, backend="tvm", progress=False)
    for _ in range(3):                                     # out-of-bounds reads vary from call to call
        for got, want in zip(cm(x, positions), model(x, positions), strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_a_portable_target_records_its_features_and_a_missing_one_refuses_to_load(tmp_path):
    import json

    from graphopt.backends.tvm.runner import X86_64_LEVELS, cpu_flags
    flags = cpu_flags()
    if flags is None or not set(X86_64_LEVELS["x86-64-v3"]) <= flags:
        pytest.skip("this CPU is not x86-64-v3")
    model, x = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU()), torch.randn(4, 16)
    cm = graphopt.compile(model, (x,), backend="tvm", backend_options={"target": "x86-64-v3"}, progress=False)
    path = cm.save(str(tmp_path / "portable"))
    manifest_path = tmp_path / "portable" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    features = manifest["backend_options"]["cpu_features"]
    assert "avx2" in features and "fma" in features and not any(f.startswith("avx512") for f in features)
    assert_close_to_scale(graphopt.load(path)(x.numpy()), model(x), 1e-4)
    manifest["backend_options"]["cpu_features"] = features + ["avx512f", "amx_tile"]
    manifest_path.write_text(json.dumps(manifest))
    missing = sorted({"avx512f", "amx_tile"} - flags)
    if not missing:
        pytest.skip("this CPU has AVX-512 and AMX")
    with pytest.raises(graphopt.ArtifactError, match="needs CPU features this machine lacks: " + ", ".join(missing)):
        graphopt.load(path)


def test_an_unknown_target_name_is_one_line():
    with pytest.raises(graphopt.BackendError, match="unknown TVM target 'x86-64-v9'"):
        graphopt.compile(torch.nn.Linear(2, 2), (torch.randn(1, 2),), backend="tvm",
                         backend_options={"target": "x86-64-v9"}, progress=False)
