"""Layer-streaming compile: a checkpoint folder compiles with its weights read one at a time,
to exactly the graph the in-memory compile makes, within a memory limit the fp32 model exceeds."""
import json
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers

import graphopt
from graphopt.errors import CaptureError, GraphoptError
from graphopt.ir.graph import add_constant, constant_value
from graphopt.ir.linear import linear_weight
from graphopt.passes import Pass, PassResult

CONFIGS = {
    "llama": transformers.LlamaConfig(hidden_size=128, num_hidden_layers=2, intermediate_size=256,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                                      tie_word_embeddings=True),
    "qwen2": transformers.Qwen2Config(hidden_size=128, num_hidden_layers=2, intermediate_size=256,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                                      tie_word_embeddings=False),       # q/k/v biases, an untied head
}


def saved(name: str, folder) -> torch.nn.Module:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS[name]).eval()
    for p in model.parameters():                 # norms and biases away from their initial 1 / 0
        p.data += 0.01 * torch.randn_like(p)
    model.save_pretrained(str(folder))
    return model


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("passes", ["default", "int4"])
def test_a_streamed_compile_equals_the_in_memory_one(name, passes, tmp_path):
    model = saved(name, tmp_path / "ckpt")
    ids = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(1))
    in_memory = graphopt.compile(model, (ids,), passes=passes, progress=False)
    streamed = graphopt.compile(str(tmp_path / "ckpt"), (ids,), passes=passes, progress=False)
    assert streamed.stats["weights_streamed"] and "weights streamed" in streamed.stats["source"]
    assert [r.changes for r in streamed.records] == [r.changes for r in in_memory.records]
    want, got = in_memory.captured.graph_module.state_dict(), streamed.captured.graph_module.state_dict()
    assert sorted(got) == sorted(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert torch.equal(streamed(ids)[0], in_memory(ids)[0])
    path = streamed.save(str(tmp_path / "artifact"))
    assert torch.equal(torch.as_tensor(graphopt.load(path)(ids.numpy())[0]), streamed(ids)[0])


class DoubleFirstWeight(Pass):
    """Makes a new weight from an existing one's values: with streamed weights, a meta tensor."""

    name = "double_first_weight"

    def run(self, gm, ctx):
        node = next(n for n in gm.graph.nodes if linear_weight(gm, n) is not None)
        doubled = add_constant(gm, "doubled", constant_value(gm, node.args[1]) * 2)
        with gm.graph.inserting_before(node):
            node.replace_input_with(node.args[1], gm.graph.get_attr(doubled))
        return PassResult(gm, True, ["doubled"])


def test_a_weight_computed_from_unloaded_weights_is_an_error_not_zeros(tmp_path):
    saved("llama", tmp_path / "ckpt")
    ids = torch.randint(0, 512, (1, 16))
    with pytest.raises(GraphoptError, match="'doubled' has no data .* computed it from weights that were not loaded"):
        graphopt.compile(str(tmp_path / "ckpt"), (ids,), passes=[DoubleFirstWeight()], verify=False,
                         progress=False)


def test_a_weight_missing_from_the_checkpoint_is_named(tmp_path):
    from safetensors.torch import load_file, save_file
    saved("llama", tmp_path / "ckpt")
    file = tmp_path / "ckpt" / "model.safetensors"
    tensors = load_file(str(file))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(file), metadata={"format": "pt"})
    with pytest.raises(CaptureError, match="'model.model.layers.1.mlp.up_proj.weight' is in none of the safetensors"):
        graphopt.compile(str(tmp_path / "ckpt"), (torch.randint(0, 512, (1, 16)),), progress=False)


LIMITED = textwrap.dedent("""
    import json, resource, sys, time
    import torch, transformers, onnxruntime, graphopt

    def status(key):
        return next(int(line.split()[1]) // 1024 for line in open("/proc/self/status") if line.startswith(key))

    mode, folder, limit_mb = sys.argv[1], sys.argv[2], int(sys.argv[3])
    limit = (status("VmData") + limit_mb) * 2**20          # on top of what the imports took
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    ids = torch.randint(0, 1000, (1, 32))
    started = time.perf_counter()
    try:
        model = folder if mode == "stream" else transformers.AutoModelForCausalLM.from_pretrained(folder)
        graphopt.compile(model, (ids,), passes="int4", progress=False)
        result = "ok"
    except (MemoryError, RuntimeError) as exc:
        result = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
    print(json.dumps({"result": result, "peak_rss_mb": status("VmHWM"), "seconds": time.perf_counter() - started}))
""")


@pytest.mark.slow
def test_int4_compile_of_a_model_larger_than_the_memory_limit(tmp_path):
    from graphopt.models.random_checkpoint import write_random_checkpoint
    config = transformers.LlamaConfig(hidden_size=1024, num_hidden_layers=40, intermediate_size=4096,
                                      num_attention_heads=16, num_key_value_heads=4, vocab_size=32000)
    weights = write_random_checkpoint(str(tmp_path / "ckpt"), config)
    limit_mb = 2000
    assert weights > 1.25 * limit_mb * 2**20               # fp32 weights: 2.56 GB

    def run(mode):
        out = subprocess.run([sys.executable, "-c", LIMITED, mode, str(tmp_path / "ckpt"), str(limit_mb)],
                             capture_output=True, text=True, timeout=1200)
        assert out.returncode == 0, out.stderr[-2000:]
        return json.loads(out.stdout.strip().splitlines()[-1])
    streamed = run("stream")
    assert streamed["result"] == "ok", streamed
    print(f"streamed int4 compile of {weights / 2**30:.2f} GiB fp32 weights under a {limit_mb} MB data limit: "
          f"peak RSS {streamed['peak_rss_mb']} MB, {streamed['seconds']:.0f} s")
    loaded = run("memory")
    assert "Cannot allocate memory" in loaded["result"] or "MemoryError" in loaded["result"], loaded
