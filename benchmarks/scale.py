"""Searches on Ray vs in this process, and how compile and search costs grow with model size.

    python benchmarks/scale.py [--sizes 30M,135M,360M,1B] [--skip-sizes] [--skip-ray] [--json out.json]

Search rows (SmolLM2, its real weights; calibration windows of calibration.txt): FinerCut
greedy (`--steps` removals, every remaining sublayer scored at each step) and head-pruning
ablation (every key/value group of every layer zeroed in turn), each run locally (one process,
torch on all threads) and on a Ray cluster started on this machine with 1 and 2 workers (each
worker an actor with cores / workers torch threads). `seconds` counts from the search's start
to its result, including the actors' setup (the graph moved through Ray's object store and
rebuilt, the base runs) but not the cluster's start. `same_result`: the Ray run chose the same
sublayers and its scores equal the local ones to 1e-5 relative. On 2 cores the ratio, not the
absolute time, is the figure: Ray can only pay for itself with more cores or machines.

Size rows: random-weight Llama-shaped models of 4 sizes (SmolLM2's shapes at 30M/135M/360M,
Llama-3.2-1B's at 1B): an fp32 -> int4 compile to ONNX Runtime (capture, int4 preset, lowering)
and one FinerCut greedy step on one window, each in its own process, with its peak RSS
(getrusage of that process; for Ray rows, of the driver: workers are Ray's processes).

Stream rows: one random-weight checkpoint folder (`--stream-size`, written layer by layer)
compiled to int4 with its weights streamed (graphopt.compile(folder, ...)) and loaded whole
(from_pretrained, then compile): the peak RSS of each. Their `seconds` include the loading.

Every row runs in a child process of this script so that each peak RSS is its own.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import print_table, write_json  # noqa: E402

COLUMNS = ["name", "executor", "workers", "seconds", "same_result", "peak_rss_mb", "params_m", "vs_local"]
# (hidden, layers, intermediate, heads, kv heads, vocab): SmolLM2-135M/360M, Llama-3.2-1B, and a 30M one
SIZES = {"30M": (384, 8, 1024, 6, 2, 49152), "135M": (576, 30, 1536, 9, 3, 49152),
         "360M": (960, 32, 2560, 15, 5, 49152), "1B": (2048, 16, 8192, 32, 8, 128256)}


def llama_config(size: str):
    import transformers
    hidden, layers, inter, heads, kv, vocab = SIZES[size]
    return transformers.LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, intermediate_size=inter,
                                    num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                                    max_position_embeddings=2048, tie_word_embeddings=True)


def random_llama(size: str):
    import torch
    import transformers
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(llama_config(size)).eval()


def smollm2_search_setup(seq_len: int, batches: int):
    import graphopt
    from graphopt.analysis.quality import token_windows
    from graphopt.cli.common import folded_graph
    from graphopt.corpus import read_text
    bundle = graphopt.models.load("smollm2")
    windows = token_windows(bundle.tokenizer, read_text("calibration.txt"), seq_len, seq_len * batches)
    return folded_graph(bundle, (windows[0],)), [(w,) for w in windows]


def search_row(spec: dict) -> dict:
    from graphopt.executors import get_executor
    from graphopt.executors.ray import connect
    from graphopt.passes.head_pruning import ablation_group_scores, find_attentions
    from graphopt.passes.layer_skipping import rank_removals
    gm, batches = smollm2_search_setup(spec["seq_len"], spec["batches"])
    executor = get_executor(spec["executor"] if spec["executor"] == "local" else "ray", spec["workers"])
    if spec["executor"] == "ray":
        connect(None)
    start = time.perf_counter()
    if spec["search"] == "finercut":
        steps = rank_removals(gm, batches, "finercut", spec["steps"], progress=False, executor=executor)
        result = [[s.names, s.js] for s in steps]
    else:
        result = ablation_group_scores(gm, find_attentions(gm), batches, progress=False, executor=executor)
    return {"seconds": time.perf_counter() - start, "result": result}


def int4_for_random_weights() -> list:
    """The int4 preset, its verification budget widened: random normal(0, 0.02) weights give
    near-flat logits that int4 moves by up to ~0.65x their largest value at 1B (SmolLM2's real
    weights: a few percent); these rows measure cost, the quality rows are elsewhere."""
    from graphopt.passes import PRESETS, WeightQuantization
    return [factory(max_output_change=2.0) if getattr(factory, "func", None) is WeightQuantization else factory()
            for factory in PRESETS["int4"]]


def size_work(spec: dict) -> dict:
    import torch

    import graphopt
    from graphopt.frontend.torch_export import capture
    from graphopt.passes import ConstantFolding
    from graphopt.passes.layer_skipping import rank_removals
    ids = torch.randint(0, 1000, (1, spec["seq_len"]), generator=torch.Generator().manual_seed(0))
    if spec["work"] == "stream":
        start = time.perf_counter()
        compiled = graphopt.compile(spec["folder"], (ids,), passes=int4_for_random_weights(), backend="onnxruntime",
                                    progress=False)
        return {"seconds": time.perf_counter() - start, "params_m": compiled.stats["parameter_bytes_captured"] / 4e6}
    start = time.perf_counter()
    if spec.get("folder"):                  # the same checkpoint as the streamed row, loaded whole
        import transformers
        model = transformers.AutoModelForCausalLM.from_pretrained(spec["folder"]).eval()
    else:
        model = random_llama(spec["size"])
        start = time.perf_counter()
    params = sum(p.numel() for p in model.parameters()) / 1e6
    if spec["work"] == "compile":
        graphopt.compile(model, (ids,), passes=int4_for_random_weights(), backend="onnxruntime", progress=False)
    else:
        gm = capture(model, (ids,)).graph_module
        ConstantFolding()(gm)
        assert rank_removals(gm, [(ids,)], "finercut", 1, progress=False)
    return {"seconds": time.perf_counter() - start, "params_m": params}


def child(spec: dict) -> None:
    row = search_row(spec) if "search" in spec else size_work(spec)
    row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("ROW " + json.dumps(row))


def run_child(spec: dict) -> dict | None:
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)],
                         capture_output=True, text=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith("ROW ")]
    if out.returncode != 0 or not lines:
        tail = (out.stderr.strip().splitlines() or ["no output"])[-1]
        print(f"  {spec}: failed ({tail})", file=sys.stderr)
        return None
    return json.loads(lines[-1][4:])


def same(result, reference) -> bool:
    if isinstance(result, list) and result and isinstance(result[0], list) and isinstance(result[0][0], list) \
            and isinstance(result[0][0][0], str):
        return [r[0] for r in result] == [r[0] for r in reference] and all(
            abs(a[1] - b[1]) <= 1e-5 * abs(b[1]) + 1e-9 for a, b in zip(result, reference))
    flat = [v for layer in result for v in layer]
    ref = [v for layer in reference for v in layer]
    return len(flat) == len(ref) and all(abs(a - b) <= 1e-5 * abs(b) + 1e-9 for a, b in zip(flat, ref))


def search_rows(args) -> list[dict]:
    rows = []
    ray_installed = importlib.util.find_spec("ray") is not None
    executors = [("local", None)] + ([] if args.skip_ray else [("ray", 1), ("ray", 2)])
    for search in ("finercut", "head ablation"):
        reference = None
        for executor, workers in executors:
            spec = {"search": "finercut" if search == "finercut" else "heads", "executor": executor,
                    "workers": workers, "seq_len": args.seq_len, "batches": args.batches, "steps": args.steps}
            name = f"{search} smollm2 {executor}" + (f" x{workers}" if workers else "")
            if executor == "ray" and not ray_installed:
                rows.append({"name": f"{name} (not installed)", "executor": executor, "workers": workers})
                continue
            print(f"running {name}", file=sys.stderr)
            got = run_child(spec)
            row = {"name": name, "executor": executor, "workers": workers or 1, "seconds": None,
                   "same_result": None, "peak_rss_mb": None, "params_m": 134.5, "vs_local": None}
            if got is not None:
                row.update(seconds=got["seconds"], peak_rss_mb=got["peak_rss_mb"])
                if executor == "local":
                    reference = got
                elif reference is not None:
                    row["same_result"] = same(got["result"], reference["result"])
                    row["vs_local"] = reference["seconds"] / got["seconds"]
            rows.append(row)
    return rows


def size_row(name: str, spec: dict) -> dict:
    print(f"running {name}", file=sys.stderr)
    got = run_child(spec)
    return {"name": name, "executor": "local", "workers": 1, "seconds": got and got["seconds"],
            "same_result": None, "peak_rss_mb": got and got["peak_rss_mb"], "params_m": got and got["params_m"],
            "vs_local": None}


def size_rows(args) -> list[dict]:
    rows = []
    for size in args.sizes.split(","):
        rows.append(size_row(f"compile int4 in-memory llama-{size}",
                             {"size": size, "work": "compile", "seq_len": args.seq_len}))
        rows.append(size_row(f"finercut 1 step llama-{size}", {"size": size, "work": "finercut",
                                                                 "seq_len": args.seq_len}))
    return rows


def stream_rows(args) -> list[dict]:
    """The int4 compile of one checkpoint folder: weights streamed vs the model loaded whole."""
    from graphopt.models.random_checkpoint import write_random_checkpoint
    with tempfile.TemporaryDirectory(prefix="graphopt-scale-") as folder:
        write_random_checkpoint(folder, llama_config(args.stream_size))
        spec = {"size": args.stream_size, "seq_len": args.seq_len, "folder": folder}
        return [size_row(f"compile int4 stream llama-{args.stream_size}", {**spec, "work": "stream"}),
                size_row(f"compile int4 in-memory (from the checkpoint) llama-{args.stream_size}",
                         {**spec, "work": "compile"})]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--sizes", default="30M,135M,360M,1B")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batches", type=int, default=2, help="calibration windows the searches score on")
    parser.add_argument("--steps", type=int, default=2, help="FinerCut greedy removals")
    parser.add_argument("--skip-ray", action="store_true")
    parser.add_argument("--skip-sizes", action="store_true")
    parser.add_argument("--stream-size", default="1B", choices=list(SIZES),
                        help="the model of the streamed vs in-memory compile rows")
    parser.add_argument("--json", help="write the rows here as a JSON list")
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    print(f"{os.cpu_count()} cores; SmolLM2 searches on {args.batches} x {args.seq_len} calibration tokens")
    rows = search_rows(args) + ([] if args.skip_sizes else size_rows(args)) + stream_rows(args)
    rows = [{column: row.get(column) for column in COLUMNS} for row in rows]
    print_table(rows, COLUMNS)
    write_json(rows, args.json)


if __name__ == "__main__":
    main()
