import json

import pytest

from graphopt.cli import main


def test_compile_inspect_and_bench(tmp_path, capsys):
    out = tmp_path / "resnet"
    assert main(["compile", "--model", "resnet", "--out", str(out), "--repeats", "2"]) == 0
    text = capsys.readouterr().out
    assert "graph nodes" in text and "latency" in text and "artifact" in text
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "checksums OK" in text and "constant_folding" in text and "input" in text
    assert main(["inspect", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["backend"] == "onnxruntime"
    assert main(["bench", str(out), "--repeats", "2"]) == 0
    assert "median" in capsys.readouterr().out


def test_errors_are_one_line_with_exit_code_1(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("graphopt: error: artifact") and "\n" not in err
    assert main(["compile", "--model", "nosuchmodel"]) == 1
    assert "unknown model 'nosuchmodel'" in capsys.readouterr().err


def test_sublayers_ranking_and_compile_with_skipping(capsys):
    assert main(["sublayers", "--model", "gpt2", "--seq-len", "16"]) == 0
    out = capsys.readouterr().out
    assert "6 residual sublayers (3 attention, 3 FFN)" in out and "transformer.h.2.mlp" in out
    assert main(["sublayers", "--model", "qwen2", "--seq-len", "16", "--rank", "finercut-oneshot", "--count", "2",
                 "--calibration-tokens", "32"]) == 0
    out = capsys.readouterr().out
    assert "FFN saturation" in out and "removal order (finercut-oneshot)" in out and "  2 " in out
    assert main(["compile", "--model", "llama", "--seq-len", "16", "--repeats", "1", "--skip-sublayers", "2",
                 "--skip-method", "tail", "--calibration-tokens", "32"]) == 0
    assert "removed ffn[2] model.layers.2.mlp" in capsys.readouterr().out
    assert main(["compile", "--model", "llama", "--fuse-ffn"]) == 1
    assert "--fuse-ffn fuses FFNs made consecutive by --skip-sublayers" in capsys.readouterr().err


def test_channels_and_compile_with_channel_pruning(tmp_path, capsys):
    assert main(["channels", "--model", "densenet", "--ratio", "0.3"]) == 0
    out = capsys.readouterr().out
    assert "3 channel segments, 2 with consumers" in out and "producers [stem, features.0.conv" in out
    assert "constrained                columns 540 -> 403; consumers reading all / a slice / a gather / " \
           "concatenation parts: 10 / 0 / 0 / 0" in out
    assert "16-groups, reordered" in out
    assert main(["compile", "--model", "resnet", "--repeats", "1", "--prune-channels", "0.3",
                 "--out", str(tmp_path / "pruned")]) == 0
    out = capsys.readouterr().out
    assert (
        "channel_pruning          changed" in out
        and "consumers read all kept channels: 13, a slice: 1, a gather: 1" in out
    )
    assert main(["compile", "--model", "resnet", "--repeats", "1", "--prune-channels", "0.4", "--prune-budget", "flops",
                 "--prune-scope", "global", "--out", str(tmp_path / "flops")]) == 0
    assert "flops budget 40% reached with consumers at channel ratios" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:       # the flag's choices come from ChannelPruningOptions
        main(["compile", "--model", "resnet", "--prune-channels", "0.3", "--prune-importance", "nope"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'nope' (choose from 'l1', 'l2', 'activation')" in capsys.readouterr().err


def test_compile_with_head_pruning(tmp_path, capsys):
    assert main(["compile", "--model", "llama", "--seq-len", "16", "--repeats", "1", "--prune-heads", "0.5",
                 "--out", str(tmp_path / "heads")]) == 0
    out = capsys.readouterr().out
    assert "attention_head_pruning   changed" in out and "kept key/value groups" in out


def test_compile_an_onnx_file_with_named_dims(tmp_path, capsys):
    import re

    import torch

    import graphopt
    bundle = graphopt.models.load("llama")
    path = str(tmp_path / "llama.onnx")
    torch.onnx.export(bundle.model, bundle.example_inputs(seq_len=16), path, dynamo=True, verbose=False,
                      input_names=["input_ids"], dynamic_shapes=({1: torch.export.Dim("sequence")},))
    assert main(["compile", "--model", path, "--repeats", "1"]) == 1
    assert "input 'input_ids' dim 1 is 'sequence': give its size (--dim sequence=SIZE)" in capsys.readouterr().err
    out = tmp_path / "art"
    assert main(["compile", "--model", path, "--dim", "sequence=24", "--repeats", "1", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "inputs input_ids: int64[1, 24]" in text and "onnxruntime on the file" in text
    relative = float(re.search(r"relative ([0-9.e+-]+)\)", text).group(1))
    assert relative <= 1e-5
    assert graphopt.load(str(out)).inputs[0].name == "input_ids"


def test_compile_for_text_generation_and_generate(tmp_path, capsys):
    from .test_generation import byte_tokenizer, causal_lm
    out = tmp_path / "gen"
    assert main(["compile", "--model", "llama", "--task", "text-generation", "--seq-len", "16", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "one graph for prompt and decode" in text and "relative" in text and "artifact" in text
    assert main(["generate", str(out), "--prompt", "hi"]) == 1          # a random model has no tokenizer
    assert "compiled without a tokenizer" in capsys.readouterr().err
    import graphopt
    model = causal_lm("llama")
    graphopt.compile(model, task="text-generation", tokenizer=byte_tokenizer(512), progress=False).save(str(out))
    assert main(["generate", str(out), "--prompt", "hello", "--max-new-tokens", "8"]) == 0
    captured = capsys.readouterr()
    assert captured.out.endswith("\n") and "prompt: 5 tokens" in captured.err and "generated: 8 tokens" in captured.err
    assert "time to first token" in captured.err
    assert main(["compile", "--model", "resnet", "--task", "text-generation"]) == 1
    assert "needs a causal language model" in capsys.readouterr().err


def test_text_generation_takes_the_backend_options(tmp_path, capsys):
    """--precision and --tvm-target reach a generation artifact's backend (they were dropped)."""
    pytest.importorskip("tvm")
    out = tmp_path / "gen-int8"
    assert main(["compile", "--model", "llama", "--task", "text-generation", "--seq-len", "16", "--backend", "tvm",
                 "--precision", "int8", "--tvm-target", "x86-64-v3", "--calibration-tokens", "32",
                 "--out", str(out)]) == 0
    backend = json.loads((out / "manifest.json").read_text())["backend_options"]
    assert backend["precision"] == "int8" and backend["kernel"] == "avx2_int8"
    assert backend["target"]["mcpu"] == "x86-64-v3" and backend["int8_plan_batches"] == 3
    assert "int8" in capsys.readouterr().out


def test_artifact_commands_parse_without_importing_torch():
    import subprocess
    import sys
    code = ("import sys; from graphopt.cli import build_parser; "
            "args = build_parser('inspect').parse_args(['inspect', 'x']); "
            "print(args.command, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["inspect", "False"]


def test_pruning_flags_come_from_the_pass_options(capsys):
    from graphopt.cli import build_parser
    from graphopt.passes.channel_pruning import ChannelPruningOptions
    args = build_parser("compile").parse_args(["compile", "--prune-budget", "flops"])
    assert args.prune_budget == "flops" and args.prune_channels == 0.0
    assert args.prune_mode == ChannelPruningOptions.mode and args.head_scope == "global"
    with pytest.raises(SystemExit):
        build_parser("compile").parse_args(["compile", "--prune-budget", "joules"])
    assert "invalid choice: 'joules'" in capsys.readouterr().err


def test_compile_at_a_reduced_precision(tmp_path, capsys):
    out = tmp_path / "llama-int8"
    assert main(["compile", "--model", "llama", "--seq-len", "16", "--repeats", "1", "--backend", "tvm",
                 "--precision", "int8", "--calibration-tokens", "0", "--out", str(out)]) == 0
    backend = json.load(open(out / "manifest.json"))["backend_options"]
    assert backend["precision"] == "int8"
    assert main(["compile", "--model", "llama", "--precision", "bf16"]) == 1        # onnxruntime has none
    assert "--precision is for --backend tvm or openvino" in capsys.readouterr().err


def test_compile_with_a_precision_override(tmp_path, capsys):
    """--precision-override mixes precisions; an int8 override gets the calibration batches."""
    out = tmp_path / "llama-mixed"
    assert main(["compile", "--model", "llama", "--seq-len", "16", "--repeats", "1", "--backend", "tvm",
                 "--precision-override", "mlp=int8", "--calibration-tokens", "32", "--out", str(out)]) == 0
    backend = json.load(open(out / "manifest.json"))["backend_options"]
    assert backend["precision"] == "f32" and backend["precision_overrides"] == {"mlp": "int8"}
    assert backend["weights_by_precision"]["int8"] > 0 and backend["int8_plan_batches"] > 1
    assert main(["compile", "--model", "llama", "--precision-override", "mlp=int8"]) == 1
    assert "--precision-override is for --backend tvm" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["compile", "--model", "llama", "--backend", "tvm", "--precision-override", "int8"])
    assert "expected PATTERN=PRECISION, got 'int8'" in capsys.readouterr().err


def test_compile_a_checkpoint_folder_streams_its_weights(tmp_path, capsys):
    import transformers

    from graphopt.models.random_checkpoint import write_random_checkpoint
    config = transformers.LlamaConfig(hidden_size=128, num_hidden_layers=2, intermediate_size=256,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=512)
    write_random_checkpoint(str(tmp_path / "ckpt"), config)
    assert main(["compile", "--model", str(tmp_path / "ckpt"), "--passes", "int4", "--seq-len", "16",
                 "--repeats", "1", "--out", str(tmp_path / "int4")]) == 0
    text = capsys.readouterr().out
    assert "weights were streamed" in text and "each pass verified on the streamed graph" in text
    assert main(["inspect", str(tmp_path / "int4")]) == 0
    assert "weight_quantization" in capsys.readouterr().out
