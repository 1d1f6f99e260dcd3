"""The executor seam: Workload (what to evaluate), Session (a worker pool holding one
workload), Executor (makes sessions); the local executor runs everything in this process."""
from __future__ import annotations

from typing import Any, Iterable

from ..errors import GraphoptError


class Workload:
    """Picklable description of a search's evaluations. `setup()` runs once per worker and
    returns its state (an evaluator with the graph and batches); `evaluate(state, candidate)`
    scores one candidate. Candidates and results are small picklable values; evaluations of
    one session may update the state (a rebase), never in a way that changes a result."""

    def setup(self) -> Any:
        raise NotImplementedError

    def evaluate(self, state: Any, candidate: Any) -> Any:
        raise NotImplementedError


class Session:
    """Workers holding one workload. map() returns results in candidate order."""

    def map(self, candidates: Iterable, bar=None) -> list:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Executor:
    name = "executor"
    workers = 1

    def session(self, workload: Workload) -> Session:
        raise NotImplementedError

    def describe(self) -> str:
        return self.name


class _LocalSession(Session):
    def __init__(self, workload: Workload):
        self.workload = workload
        self.state = workload.setup()

    def map(self, candidates, bar=None):
        results = []
        for candidate in candidates:
            results.append(self.workload.evaluate(self.state, candidate))
            if bar is not None:
                bar.update()
        return results


class LocalExecutor(Executor):
    """Every evaluation in this process, one after another (torch uses all its threads)."""

    name = "local"

    def session(self, workload):
        return _LocalSession(workload)


def get_executor(spec: "str | Executor | None" = None, workers: int | None = None) -> Executor:
    """None or "local": in this process. "ray" or "auto": a running Ray cluster if there is one,
    else a local one started on this machine; "host:port" or "ray://...": that cluster.
    `workers`: Ray actors (default: one per CPU of the cluster)."""
    if isinstance(spec, Executor):
        return spec
    if spec is None or spec == "local":
        if workers not in (None, 1):
            raise GraphoptError("workers= needs a Ray executor (executor='ray' or an address)")
        return LocalExecutor()
    if not isinstance(spec, str):
        raise GraphoptError(f"executor must be 'local', 'ray', a Ray address or an Executor, not {spec!r}")
    from .ray import RayExecutor
    return RayExecutor(None if spec in ("ray", "auto") else spec, workers)
