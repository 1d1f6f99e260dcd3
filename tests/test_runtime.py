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
