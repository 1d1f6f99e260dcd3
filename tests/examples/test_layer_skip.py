from ..conftest import load_example


def test_layer_skip_example_removes_and_reports(capsys):
    result = load_example("layer_skip.py").main(["--model", "llama", "--seq-len", "16", "--remove", "2",
                                                 "--method", "bi", "--calibration-windows", "2"])
    assert len(result["removed"]) == 2
    assert result["output_shape"] == (1, 16, 512)
    out = capsys.readouterr().out
    assert "removed: model.layers." in out and "quality on 32 calibration rows" in out and "artifact:" in out
