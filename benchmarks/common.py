"""Shared benchmark plumbing: timing, a readable table, and --json output."""
from __future__ import annotations

import json
import os
import random
import statistics
import time
from typing import Callable


def interleaved_medians(candidates: dict[str, Callable[[], object]], repeats: int,
                        warmup: int = 2, calls_per_round: int = 1, settle_s: float = 0.1,
                        seed: int = 0) -> dict[str, float]:
    """Median seconds per call, timing candidates round-robin so that a burst of load on a
    shared machine hits every candidate alike instead of whichever ran during it.

    A candidate's call is slowed by whatever ran just before it: ONNX Runtime's and OpenMP's
    worker threads keep spinning after a call and hold a core (on 2 cores, SmolLM2 measured
    10-15% slower after another ONNX Runtime session than after torch eager, in a fixed
    order). So every round runs the candidates in a fresh random order, with `settle_s` of
    idle time before each timed block (0.1 s removed the effect; 0.02 s did not always).

    `calls_per_round` > 1 times a block of consecutive calls per candidate and round (seconds
    per call = block / calls), after one untimed call: for millisecond models."""
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    order = list(candidates)
    shuffle = random.Random(seed).shuffle
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        shuffle(order)
        for name in order:
            fn = candidates[name]
            if settle_s > 0:
                time.sleep(settle_s)
            if calls_per_round > 1:
                fn()                              # the first call after a switch pays for it
            start = time.perf_counter()
            for _ in range(calls_per_round):
                fn()
            times[name].append((time.perf_counter() - start) / calls_per_round)
    return {name: statistics.median(t) for name, t in times.items()}


def print_table(rows: list[dict], columns: list[str]) -> None:
    def fmt(v):
        if isinstance(v, float):
            if v != 0 and abs(v) < 1e-2:
                return f"{v:.1e}"
            return f"{v:.3f}" if abs(v) < 1000 else f"{v:.0f}"
        return "" if v is None else str(v)
    widths = {c: max(len(c), *(len(fmt(r.get(c))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    print("  ".join("-" * widths[c] for c in columns))
    for r in rows:
        print("  ".join(fmt(r.get(c)).ljust(widths[c]) for c in columns))


def write_json(rows: list[dict], path: str | None) -> None:
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(rows, f, indent=2)
