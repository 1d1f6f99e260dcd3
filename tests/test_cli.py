import json

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
