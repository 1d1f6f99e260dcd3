import os

import pytest

from graphopt.errors import GraphoptError
from graphopt.runtime import default_threads


def test_default_threads_follows_the_environment(monkeypatch):
    monkeypatch.delenv("GRAPHOPT_NUM_THREADS", raising=False)
    assert default_threads() == (os.cpu_count() or 1)
    monkeypatch.setenv("GRAPHOPT_NUM_THREADS", "3")
    assert default_threads() == 3
    for bad in ("0", "-1", "two", ""):
        monkeypatch.setenv("GRAPHOPT_NUM_THREADS", bad)
        with pytest.raises(GraphoptError, match="GRAPHOPT_NUM_THREADS must be a positive integer"):
            default_threads()


@pytest.mark.parametrize("name, new", [("OrtRunner", "graphopt.backends.onnxruntime.runner"),
                                       ("TvmRunner", "graphopt.backends.tvm.runner"),
                                       ("check_cpu_features", "graphopt.backends.tvm.runner")])
def test_runner_names_moved_to_their_backends_still_import_with_a_warning(name, new):
    import importlib

    import graphopt.runtime as runtime
    with pytest.warns(DeprecationWarning, match=f"graphopt.runtime.{name} moved to {new}.{name}"):
        value = getattr(runtime, name)
    assert value is getattr(importlib.import_module(new), name)
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        runtime.nothing_here
