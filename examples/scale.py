"""Scale out and past memory: a layer-skipping search on Ray, and an int4 compile that streams a
checkpoint's weights from disk instead of loading the model.

    python examples/scale.py                      # a local Ray cluster with 2 workers, a random Llama
    python examples/scale.py --ray 10.0.0.5:6379  # an existing cluster
    python examples/scale.py --hidden 2048 --layers 24   # a checkpoint of 1.7B parameters

1. FinerCut picks 2 sublayers to remove, once in this process and once on Ray; the choices and
   their scores are the same.
2. A random-weight checkpoint folder is written one layer at a time, then compiled to int4 with
   graphopt.compile(folder, ...): the fp32 model is never in memory. The peak RSS is printed
   next to the checkpoint's fp32 size.
"""
from __future__ import annotations

import argparse
import resource
import tempfile
import time

import torch
import transformers

import graphopt
from graphopt.executors import get_executor
from graphopt.models.random_checkpoint import write_random_checkpoint
from graphopt.passes import ConstantFolding, DeadCodeElimination, LayerSkipping


def search(args) -> dict:
    bundle = graphopt.models.load("llama")
    inputs = bundle.example_inputs(seq_len=args.seq_len)
    batches = [bundle.example_inputs(seq_len=args.seq_len, seed=s) for s in (1, 2, 3)]
    results = {}
    for name, executor in (("local", None), ("ray", get_executor(args.ray, args.workers))):
        started = time.perf_counter()
        compiled = graphopt.compile(bundle.model, inputs, passes=[ConstantFolding(), LayerSkipping(sublayers=2),
                                                                  DeadCodeElimination()],
                                    calibration=batches, executor=executor, progress=False)
        record = next(r for r in compiled.records if r.name == "layer_skipping")
        results[name] = record.changes[:-1] + record.notes
        print(f"{name:5s} ({time.perf_counter() - started:.1f} s): " + "; ".join(results[name]))
    print("same choices and scores:", results["local"] == results["ray"])
    return results


def stream(args) -> dict:
    config = transformers.LlamaConfig(hidden_size=args.hidden, num_hidden_layers=args.layers,
                                      intermediate_size=4 * args.hidden, num_attention_heads=args.hidden // 64,
                                      num_key_value_heads=max(1, args.hidden // 256), vocab_size=32000)
    with tempfile.TemporaryDirectory(prefix="graphopt-example-") as folder:
        weights = write_random_checkpoint(folder, config)
        ids = torch.randint(0, 32000, (1, args.seq_len))
        started = time.perf_counter()
        compiled = graphopt.compile(folder, (ids,), passes="int4", progress=False)
        seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{compiled.stats['source']}: {weights / 1e6:.0f} MB of fp32 weights -> "
          f"{compiled.stats['parameter_bytes_optimized'] / 1e6:.0f} MB int4 in {seconds:.0f} s; "
          f"this process's peak RSS {peak:.0f} MB")
    return {"weights": weights, "quantized": compiled.stats["parameter_bytes_optimized"], "peak_rss_mb": peak}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ray", default="ray", help="'ray' (a running cluster, or one started here) or an address")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    args = ap.parse_args(argv)
    return {"search": search(args), "stream": stream(args)}


if __name__ == "__main__":
    main()
