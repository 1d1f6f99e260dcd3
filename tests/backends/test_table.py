"""The backends table: one line per backend names its lowering class and its torch-free
loader; artifact loading goes through it with no per-backend branch."""
import subprocess
import sys
import textwrap

import pytest

from graphopt.backends import BACKENDS, available, get_backend, runner_loader
from graphopt.backends.base import Backend
from graphopt.errors import ArtifactError, BackendError


@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_every_backend_in_the_table_resolves_to_its_class_and_loader(name):
    backend = get_backend(name)
    assert isinstance(backend, Backend) and backend.name == name
    if BACKENDS[name][1] is None:
        with pytest.raises(ArtifactError, match=f"backend '{name}' cannot be loaded"):
            runner_loader(name, "/some/artifact")
    else:
        assert runner_loader(name, "/some/artifact").__name__ == "load_runner"


def test_unknown_backends_are_one_line_errors():
    assert available() == list(BACKENDS)
    with pytest.raises(BackendError, match="unknown backend 'tensorrt'; available: torch, onnxruntime, tvm, openvino"):
        get_backend("tensorrt")
    with pytest.raises(ArtifactError, match="artifact /a: backend 'tensorrt' cannot be loaded by this graphopt"):
        runner_loader("tensorrt", "/a")


def test_backend_packages_and_runners_import_without_torch():
    code = textwrap.dedent("""
        import sys
        sys.modules["torch"] = None            # any `import torch` now raises ImportError
        import graphopt.backends.onnxruntime
        import graphopt.backends.tvm
        import graphopt.backends.openvino
        from graphopt.backends import runner_loader
        from graphopt.backends.openvino.runner import OpenVinoRunner
        from graphopt.backends.onnxruntime.runner import OrtRunner
        from graphopt.backends.tvm.runner import TvmRunner
        assert runner_loader("onnxruntime", "x").__module__ == "graphopt.backends.onnxruntime.runner"
        assert runner_loader("tvm", "x").__module__ == "graphopt.backends.tvm.runner"
        assert runner_loader("openvino", "x").__module__ == "graphopt.backends.openvino.runner"
        try:
            graphopt.backends.onnxruntime.OnnxRuntimeBackend     # the lowering side does need torch
        except ImportError:
            print("lowering needs torch")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "lowering needs torch"


def test_old_names_of_a_backend_package_read_its_lower_module():
    import graphopt.backends.onnxruntime as ort_package
    from graphopt.backends.onnxruntime import lower
    assert ort_package.CUSTOM_TRANSLATIONS is lower.CUSTOM_TRANSLATIONS
    assert ort_package.export_onnx is lower.export_onnx
    with pytest.raises(AttributeError, match="has no attribute 'nothing_here'"):
        ort_package.nothing_here
