"""Reduced-precision compute: the same model at fp32, bf16 and int8 on the TVM backend (graphopt's
AMX / AVX-512 kernels), in bf16 with the LM head in int8 (mixed precision), and at OpenVINO's
default precision, with what each costs.

    python examples/reduced_precision.py                     # llama config (random weights)
    python examples/reduced_precision.py --model smollm2 --seq-len 128

For every variant it prints the kernel the CPU got (or that it fell back to fp32), the pass-log
entry the lowering added (largest output change on the example inputs; JS divergence, top-1
agreement and perplexity against the fp32 graph on the calibration batches) and the median
latency of a few calls next to fp32's.
"""
from __future__ import annotations

import argparse
import statistics
import time

import graphopt

# OpenVINO at two threads: 2026.4 crashes compiling bf16 with one (the backend refuses it)
# "bf16, lm_head int8": mixed precision, the LM head's weights in the int8 kernel, the rest in bf16
VARIANTS = [("tvm", {"precision": "f32"}), ("tvm", {"precision": "bf16"}), ("tvm", {"precision": "int8"}),
            ("tvm", {"precision": "bf16", "precision_overrides": {"lm_head": "int8"}}),
            ("openvino", {"precision": "default", "threads": 2})]


def median_ms(cm, inputs, calls: int) -> float:
    cm(*inputs)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        cm(*inputs)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama")
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--calls", type=int, default=5)
    args = ap.parse_args(argv)

    bundle = graphopt.models.load(args.model)
    calibration = [bundle.example_inputs(seq_len=args.seq_len, seed=s) for s in range(1, 4)]
    inputs = calibration[0]
    results = {}
    for backend, options in VARIANTS:
        name = f"{backend} {options['precision']}" + "".join(
            f", {pattern} {precision}" for pattern, precision in options.get("precision_overrides", {}).items())
        cm = graphopt.compile(bundle.model, inputs, backend=backend, backend_options=options,
                              calibration=calibration, progress=False)
        record = cm.records[-1] if cm.records and cm.records[-1].name.startswith("lower:") else None
        ms = median_ms(cm, inputs, args.calls)
        results[name] = {"ms": ms, "record": record}
        if record is None:
            print(f"{name}: fp32, {ms:.1f} ms")
            continue
        quality = record.quality or {}
        print(f"{name}: {record.notes[0]}; {ms:.1f} ms; max |diff| {record.max_output_diff:.2e}, "
              f"JS {quality.get('js', float('nan')):.2e}, top-1 {quality.get('top1_agreement', float('nan')):.3f}")
    return results


if __name__ == "__main__":
    main()
