"""The ONNX package's operator conformance cases run through graphopt's ONNX importer.

`onnx.backend.test.case.node.collect_testcases()` gives ~1,900 one-node models with inputs
and the outputs the spec's reference implementation computes. A case whose ops are all in
the importer's table must either reproduce those outputs or raise UnsupportedOpError; a
wrong output or any other exception is a defect. Run as a script for the counts:

    python -m tests.conformance.onnx_cases [--backend torch|onnxruntime|tvm] [--json PATH]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import warnings

import numpy as np

# Scale-relative tolerance per output dtype: 1e-4 for float32/64, the type's own rounding
# for half precision.
TOLERANCE = {np.dtype(np.float64): 1e-4, np.dtype(np.float32): 1e-4, np.dtype(np.float16): 2e-3}
# Cases whose expected outputs are written out by hand to 4 significant digits.
ROUNDED_REFERENCE = {"test_averagepool_2d_ceil_last_window_starts_on_pad": 5e-4}


@dataclasses.dataclass
class Outcome:
    name: str
    status: str          # pass | unsupported | refused (another graphopt error) | wrong | error (foreign)
    detail: str = ""


def supported_cases():
    """The node cases whose ops all have a translation in the importer, by name."""
    from onnx.backend.test.case.node import collect_testcases

    from graphopt.frontend.onnx import OPS
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cases = collect_testcases()
    known = set(OPS) | {"Constant"}
    return sorted((c for c in cases if {n.op_type for n in c.model.graph.node} <= known and c.data_sets),
                  key=lambda c: c.name)


def _as_array(value):
    from onnx import TensorProto, numpy_helper
    return numpy_helper.to_array(value) if isinstance(value, TensorProto) else value


def _as_input(array):
    """A torch tensor for the compile call; dtypes torch cannot hold become a float32
    placeholder, which the importer must reject by the graph's declared element type."""
    import torch
    array = np.asarray(_as_array(array))
    try:
        return torch.from_numpy(array.copy())
    except TypeError:
        return torch.zeros(array.shape, dtype=torch.float32)


def compare(name: str, got, expected) -> str:
    """'' when `got` equals `expected` (shape, dtype, values), else what differs."""
    if len(got) != len(expected):
        return f"{len(got)} outputs, expected {len(expected)}"
    for k, (g, e) in enumerate(zip(got, expected)):
        g, e = np.asarray(g), np.asarray(_as_array(e))
        if g.shape != e.shape or g.dtype != e.dtype:
            return f"output {k}: {g.dtype}{list(g.shape)}, expected {e.dtype}{list(e.shape)}"
        if e.dtype.kind in "fc":
            if not np.array_equal(np.isnan(g), np.isnan(e)):
                return f"output {k}: NaN in different places"
            finite = ~np.isnan(e)
            if not np.array_equal(g[np.isinf(e)], e[np.isinf(e)]):
                return f"output {k}: infinities differ"
            finite &= ~np.isinf(e)
            if finite.any():
                gf, ef = g[finite].astype(np.float64), e[finite].astype(np.float64)
                err = np.abs(gf - ef).max() / max(np.abs(ef).max(), 1e-30)
                if err > ROUNDED_REFERENCE.get(name, TOLERANCE.get(e.dtype, 1e-4)):
                    return f"output {k}: relative error {err:.3g}"
        elif not np.array_equal(g, e):
            return f"output {k}: {int((g != e).sum())} of {e.size} values differ"
    return ""


def run_case(case, backend: str = "torch", workdir: str | None = None) -> Outcome:
    """Compile `case`'s model with passes='none' on `backend`, run its first data set."""
    import onnx
    import torch

    import graphopt
    from graphopt.errors import GraphoptError, UnsupportedOpError
    inputs, expected = case.data_sets[0]
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        path = os.path.join(tmp, f"{case.name}.onnx")
        onnx.save(case.model, path)
        try:
            args = tuple(_as_input(x) for x in inputs)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                compiled = graphopt.compile(path, args, passes="none", backend=backend, progress=False)
                got = compiled(*args)
        except UnsupportedOpError as exc:
            return Outcome(case.name, "unsupported", str(exc))
        except GraphoptError as exc:
            return Outcome(case.name, "refused", f"{type(exc).__name__}: {exc}")
        except Exception as exc:
            return Outcome(case.name, "error", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    got = got if isinstance(got, (tuple, list)) else (got,)
    got = [g.detach().numpy() if isinstance(g, torch.Tensor) else g for g in got]
    difference = compare(case.name, got, expected)
    return Outcome(case.name, "wrong" if difference else "pass", difference)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="torch")
    parser.add_argument("--json", help="write one row per case here")
    parser.add_argument("--only", help="substring of the case names to run")
    args = parser.parse_args()
    from tqdm import tqdm
    cases = [c for c in supported_cases() if not args.only or args.only in c.name]
    outcomes = [
        run_case(c, args.backend) for c in tqdm(cases, desc=f"cases ({args.backend})", unit="case", disable=None)
    ]
    counts = {s: sum(o.status == s for o in outcomes) for s in ("pass", "unsupported", "refused", "wrong", "error")}
    print(f"{'backend':<12} {'cases':>6} " + " ".join(f"{s:>11}" for s in counts))
    print(f"{args.backend:<12} {len(outcomes):>6} " + " ".join(f"{n:>11}" for n in counts.values()))
    for o in outcomes:
        if o.status in ("refused", "wrong", "error"):
            print(f"  {o.status}: {o.name}: {o.detail}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dataclasses.asdict(o) | {"backend": args.backend} for o in outcomes], f, indent=1)


if __name__ == "__main__":
    main()
