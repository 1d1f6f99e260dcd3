"""Ray executor: a session's workers are Ray actors that set the workload up once (the
workload travels through Ray's object store) and evaluate candidates handed out one at a time,
results collected in candidate order. An actor that dies is restarted and its candidate
retried (Ray's max_restarts / max_task_retries): a result never depends on which worker, or
how many, computed it."""
from __future__ import annotations

import os

from ..errors import GraphoptError
from .base import Executor, Session, Workload

RETRIES = 3


def connect(address: str | None) -> dict:
    """Connect to the cluster at `address`; None: the running one, else start one here on the
    loopback interface. Returns the cluster's resources."""
    try:
        import ray
    except ImportError as exc:
        raise GraphoptError("the Ray executor needs ray (pip install ray)") from exc
    if not ray.is_initialized():
        options = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
        if address is not None:
            ray.init(address=address, **options)
        else:
            try:
                ray.init(address="auto", **options)
            except ConnectionError:
                ray.init(num_cpus=os.cpu_count(), _node_ip_address="127.0.0.1", **options)
    return ray.cluster_resources()


class _Worker:
    def __init__(self, shared: list, threads: int):
        import ray
        import torch
        torch.set_num_threads(threads)
        # the workload's reference comes inside a list: Ray then lends it (a restarted actor
        # fetches it again) instead of pinning it as a constructor argument
        self.workload, self.state = ray.get(shared[0]), None

    def evaluate(self, candidate):
        if self.state is None:
            self.state = self.workload.setup()
        return self.workload.evaluate(self.state, candidate)

    def pid(self) -> int:
        return os.getpid()


class RaySession(Session):
    def __init__(self, workload: Workload, workers: int, cpus: float, threads: int):
        import ray
        from ray.util import ActorPool
        actor = ray.remote(_Worker).options(num_cpus=cpus, max_restarts=RETRIES, max_task_retries=RETRIES)
        self.shared = ray.put(workload)
        self.actors = [actor.remote([self.shared], threads) for _ in range(workers)]
        self.pool = ActorPool(self.actors)

    def map(self, candidates, bar=None):
        results = []
        for result in self.pool.map(lambda worker, candidate: worker.evaluate.remote(candidate), list(candidates)):
            results.append(result)
            if bar is not None:
                bar.update()
        return results

    def close(self):
        import ray
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []


class RayExecutor(Executor):
    """`address`: None for the running cluster (or a local one started here), else a Ray
    address. `workers`: actors per session (default: one per CPU), each with an equal share
    of the cluster's CPUs as torch threads."""

    name = "ray"

    def __init__(self, address: str | None = None, workers: int | None = None):
        if workers is not None and workers < 1:
            raise GraphoptError(f"workers must be at least 1, got {workers}")
        self.address = address
        self.requested = workers
        self.cpus = None

    @property
    def workers(self) -> int:
        self._connect()
        return self.requested or max(1, self.cpus)

    def _connect(self) -> None:
        if self.cpus is None:
            self.cpus = int(connect(self.address).get("CPU", 1))

    def session(self, workload):
        self._connect()
        workers = self.workers
        return RaySession(workload, workers, self.cpus / workers, max(1, self.cpus // workers))

    def describe(self) -> str:
        return f"ray ({self.workers} workers)"
