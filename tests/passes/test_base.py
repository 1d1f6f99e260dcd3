from dataclasses import dataclass
from typing import Callable

import pytest

from graphopt.errors import GraphoptError
from graphopt.passes.base import Pass, option


@dataclass
class _Options:
    ratio: float = option(0.5, "a share", at_least=0.0, below=1.0)
    count: int = option(1, "at least one", at_least=1)
    mode: str = option("a", "a or b", choices=("a", "b"))
    score: str | Callable = option("l1", "a name or a function", choices=("l1",), or_callable=True)
    free: str = "anything"                 # a plain field is not checked


class _Demo(Pass):
    Options = _Options


@pytest.mark.parametrize("overrides,message", [
    ({"ratio": 1.0}, "_Demo ratio must be in [0.0, 1.0), got 1.0"),
    ({"ratio": -0.1}, "_Demo ratio must be in [0.0, 1.0), got -0.1"),
    ({"count": 0}, "_Demo count must be >= 1, got 0"),
    ({"mode": "c"}, "_Demo mode must be one of 'a', 'b', got 'c'"),
    ({"score": "l9"}, "_Demo score must be one of 'l1' or a callable, got 'l9'"),
])
def test_options_outside_their_fields_are_one_line_errors(overrides, message):
    with pytest.raises(GraphoptError) as info:
        _Demo(**overrides)
    assert str(info.value) == message


def test_accepted_options_pass():
    demo = _Demo(ratio=0.0, count=3, mode="b", score=lambda w: w, free="x")
    assert demo.options.mode == "b" and callable(demo.options.score)
