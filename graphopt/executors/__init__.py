"""Where a search's candidate evaluations run: in this process (the default) or on Ray actors.

A search describes its work as a `Workload`: what a worker builds once (an evaluator that holds
the graph and the calibration batches) and how it evaluates one candidate. It opens a session
on an executor and maps candidates through it; results come back in candidate order, so the
search makes the same choices wherever they ran.

    executor = get_executor("ray", workers=2)      # or "local", or a Ray address
    with executor.session(workload) as session:
        scores = session.map(candidates, bar)

compile(..., executor=...) and the CLI's --ray / --workers choose it for every search pass.
"""
from __future__ import annotations

from .base import Executor, LocalExecutor, Session, Workload, get_executor

__all__ = ["Executor", "LocalExecutor", "Session", "Workload", "get_executor"]
