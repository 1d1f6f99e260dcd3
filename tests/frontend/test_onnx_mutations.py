"""A few hundred seeded mutations of a valid ONNX model (flipped, cut, inserted bytes; wrong
dims, dangling inputs, cycles, bad attribute types and values, huge shapes, unknown types and
opsets): each is a one-line graphopt error or a compile equal to onnxruntime's result. Each
runs in a worker subprocess under a time limit, so a crash or a hang is counted, not hidden."""
import os
import queue
import subprocess
import sys
import threading
import time

from .onnx_mutations import mutations

COUNT = 300
SECONDS_EACH = 60


def _run_all(count: int) -> dict[int, tuple[str, str]]:
    """index -> (status, detail); a worker that dies or hangs is restarted after that index."""
    results: dict[int, tuple[str, str]] = {}
    pending = list(range(count))
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    while pending:
        worker = subprocess.Popen([sys.executable, "-m", "tests.frontend.onnx_mutations", str(count)], cwd=root,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda out=worker.stdout: [lines.put(line) for line in out] + [lines.put(None)],
                         daemon=True).start()
        first = True                                   # the worker's first case also waits for its imports
        while pending:
            index = pending.pop(0)
            worker.stdin.write(f"{index}\n")
            worker.stdin.flush()
            done = _next_done(lines, time.monotonic() + SECONDS_EACH + (60 if first else 0))
            first = False
            if done is None:
                worker.kill()
                worker.wait()
                results[index] = ("hang" if worker.returncode == -9 else "crash", f"worker exit {worker.returncode}")
                break
            _, _, status, *detail = done.rstrip("\n").split(" ", 3) + [""]
            results[index] = (status, detail[0])
        else:
            worker.stdin.close()
            worker.wait()
    return results


def _next_done(lines: queue.Queue, deadline: float) -> str | None:
    """The worker's next "done" line, or None if it exits or the deadline passes first."""
    while True:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            return None
        if line is None or line.startswith("done"):
            return line


def test_mutated_onnx_models_give_graphopt_errors_or_correct_compiles():
    results = _run_all(COUNT)
    descriptions = [d for d, _ in mutations(COUNT)]
    bad = [f"{descriptions[i]}: {s}: {d}" for i, (s, d) in sorted(results.items())
           if s not in ("error", "ok")]
    assert not bad, f"{len(bad)} of {COUNT}:\n" + "\n".join(bad)
    assert sum(s == "error" for s, _ in results.values()) > COUNT // 2
