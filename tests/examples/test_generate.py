import pytest

from ..conftest import load_example


@pytest.mark.slow
def test_generate_example_streams_a_reply(capsys, tmp_path):
    text = load_example("generate.py").main(["--passes", "default", "--no-chat", "--prompt", "The capital of France is",
                                             "--max-new-tokens", "8", "--out", str(tmp_path / "gen")])
    assert "Paris" in text
    out = capsys.readouterr().out
    assert text in out and "tokens/s" in out and "time to first token" in out


@pytest.mark.slow
def test_generate_example_on_tvm(capsys, tmp_path):
    pytest.importorskip("tvm")
    text = load_example("generate.py").main(["--passes", "default", "--backend", "tvm", "--no-chat", "--prompt",
                                             "The capital of France is", "--max-new-tokens", "8",
                                             "--out", str(tmp_path / "gen")])
    assert "Paris" in text and "tokens/s" in capsys.readouterr().out
