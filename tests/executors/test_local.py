"""The executor seam in this process: sessions set a workload up once and keep candidate order."""
import pytest

from graphopt.errors import GraphoptError
from graphopt.executors import LocalExecutor, Workload, get_executor


class Counting(Workload):
    def __init__(self):
        self.setups = 0

    def setup(self):
        self.setups += 1
        return {"base": 10}

    def evaluate(self, state, candidate):
        return state["base"] + candidate


def test_a_local_session_sets_up_once_and_keeps_order():
    workload = Counting()
    with LocalExecutor().session(workload) as session:
        assert session.map([3, 1, 2]) == [13, 11, 12]
        assert session.map([5]) == [15]
    assert workload.setups == 1


def test_executor_specs():
    assert get_executor(None).name == get_executor("local").name == "local"
    executor = LocalExecutor()
    assert get_executor(executor) is executor
    with pytest.raises(GraphoptError, match="workers= needs a Ray executor"):
        get_executor("local", workers=2)
    with pytest.raises(GraphoptError, match="executor must be"):
        get_executor(3)
