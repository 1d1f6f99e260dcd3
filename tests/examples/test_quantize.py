import importlib.util
import os

import pytest

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "quantize.py")


def _load_example():
    spec = importlib.util.spec_from_file_location("quantize_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("scheme", ["int4", "gptq", "w8a8", "mixed"])
def test_quantize_example_shrinks_the_artifact(scheme, capsys):
    sizes = _load_example().main(["--model", "llama", "--scheme", scheme, "--seq-len", "16",
                                  "--calibration-tokens", "48"])
    assert sizes[scheme] < sizes["fp32"]
    out = capsys.readouterr().out
    assert "artifact: fp32" in out and "max |logit change|" in out
