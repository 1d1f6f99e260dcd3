"""Shared fixtures and numeric helpers. Verification runs after every pass in every test."""
from __future__ import annotations

import logging
import os

import pytest
import torch

import graphopt

logging.getLogger("torch.onnx").setLevel(logging.ERROR)

if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest-xdist runs one worker per core: one thread each, so no two spin on one core.
    os.environ.setdefault("GRAPHOPT_NUM_THREADS", "1")
    torch.set_num_threads(1)


def assert_close_to_scale(actual, expected, rel: float = 1e-4) -> float:
    """max |actual - expected| <= rel * max |expected|; returns the relative error."""
    actual, expected = torch.as_tensor(actual).detach(), torch.as_tensor(expected).detach()
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = float(expected.abs().max())
    err = float((actual - expected).abs().max()) / max(scale, 1e-30)
    assert err <= rel, f"relative error {err:.3g} > {rel}"
    return err


def run_artifact_without_torch(path: str, inputs):
    """Load and run the artifact in a subprocess where `import torch` fails; its first output."""
    import os
    import subprocess
    import sys
    import tempfile
    import textwrap

    import numpy as np
    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for i, x in enumerate(inputs):
            files.append(os.path.join(tmp, f"x{i}.npy"))
            np.save(files[-1], torch.as_tensor(x).numpy())
        script = textwrap.dedent(f"""
            import sys, numpy as np
            sys.modules["torch"] = None            # any `import torch` now raises ImportError
            import graphopt
            rt = graphopt.load({path!r})
            out = rt(*[np.load(f) for f in {files!r}])
            out = out[0] if isinstance(out, tuple) else out
            assert "torch" not in [m for m in sys.modules if sys.modules[m] is not None]
            np.save(sys.argv[1], out)
        """)
        out_file = os.path.join(tmp, "out.npy")
        subprocess.run([sys.executable, "-c", script, out_file], check=True, capture_output=True, timeout=180)
        return np.load(out_file)


def load_example(filename: str):
    """Import a script from examples/ as a module."""
    import importlib.util
    import os
    path = os.path.join(os.path.dirname(__file__), "..", "examples", filename)
    spec = importlib.util.spec_from_file_location(f"example_{filename[:-3]}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def eager_outputs(model, inputs):
    """The model's tensor outputs, flattened in the order capture uses."""
    from graphopt.frontend.torch_export import flat_tensors
    with torch.no_grad():
        return flat_tensors(model(*inputs))


def small_inputs(bundle):
    if not bundle.is_sequence_model:
        return bundle.example_inputs()
    return bundle.example_inputs(seq_len=16)


@pytest.fixture(scope="session")
def llama():
    return graphopt.models.load("llama")
