import pytest

from ..conftest import load_example


def _load_example():
    return load_example("quantize.py")


@pytest.mark.parametrize("scheme", ["int4", "gptq", "w8a8", "mixed"])
def test_quantize_example_shrinks_the_artifact(scheme, capsys):
    sizes = _load_example().main(["--model", "llama", "--scheme", scheme, "--seq-len", "16",
                                  "--calibration-tokens", "48"])
    assert sizes[scheme] < sizes["fp32"]
    out = capsys.readouterr().out
    assert "artifact: fp32" in out and "max |logit change|" in out
