"""Every ONNX node conformance case the importer's op table covers: the right outputs or an
UnsupportedOpError naming what is missing. Never a wrong output or a foreign exception."""
import functools

import pytest

from .onnx_cases import run_case, supported_cases


@functools.lru_cache(maxsize=1)
def _cases():
    return supported_cases()


def _failures(cases, backend):
    outcomes = [run_case(case, backend) for case in cases]
    return outcomes, _judge(outcomes, backend)


def _judge(outcomes, backend):
    """Wrong outputs and foreign exceptions; on the importer also any graphopt error other
    than UnsupportedOpError. A backend may refuse with its own BackendError (TVM cannot
    compile integer Pow, for one)."""
    failing = ("wrong", "error") if backend != "torch" else ("wrong", "error", "refused")
    bad = [f"{o.name}: {o.status}: {o.detail}" for o in outcomes if o.status in failing]
    names_what = ("(op ", "element type", "dtype", "tvm backend", "onnxruntime", "not a tensor")
    unclear = [f"{o.name}: {o.detail}" for o in outcomes if o.status == "unsupported" and
               ("\n" in o.detail or not any(key in o.detail for key in names_what))]
    return bad + unclear


def test_every_sixth_case_through_the_importer():
    outcomes, failures = _failures(_cases()[::6], "torch")
    assert not failures, "\n".join(failures)
    assert sum(o.status == "pass" for o in outcomes) >= 80


# The slow runs are split in shards so pytest-xdist can spread them over the cores.
SHARDS = 4


@functools.lru_cache(maxsize=None)
def _torch_outcome(index):
    return run_case(_cases()[index], "torch")


def _shard(shard):
    return range(shard, len(_cases()), SHARDS)


@pytest.mark.slow
@pytest.mark.parametrize("shard", range(SHARDS))
def test_every_case_through_the_importer(shard):
    outcomes = [_torch_outcome(i) for i in _shard(shard)]
    failures = _judge(outcomes, "torch")
    assert not failures, "\n".join(failures)
    assert sum(o.status == "pass" for o in outcomes) >= 130     # every shard passed 134 or more


@pytest.mark.slow
@pytest.mark.parametrize("shard", range(SHARDS))
@pytest.mark.parametrize("backend", ["onnxruntime", "tvm"])
def test_cases_that_import_run_the_same_on_a_backend(backend, shard):
    passing = [_cases()[i] for i in _shard(shard) if _torch_outcome(i).status == "pass"]
    if backend == "tvm":
        passing = passing[::6]              # a TVM build per case: every sixth keeps CI within its time
    outcomes, failures = _failures(passing, backend)
    assert not failures, "\n".join(failures)
