"""Per-kernel latency of an ONNX model in ONNX Runtime, mapped back to the exported graph.

ONNX Runtime's profiler times every kernel it runs, but it runs an optimized graph: fused
nodes (Conv+Relu, MatMul+Add), blocked layouts (NCHWc) and renamed nodes. Each kernel is
mapped back to a node of the graph graphopt exported (so to its module path and source
line, which the exporter stores on every node) through the optimized graph ONNX Runtime
writes: by the tensors the kernel produces, else by its name, preferring the exported node
of the kernel's own op type among those it replaced. A kernel that maps to nothing is kept
with an empty `graph_node` and counted as unattributed.

The end-to-end latency is measured in a second session without the profiler; the difference
between it and the sum of the kernels is framework time (reported as unattributed).
"""
from __future__ import annotations

import json
import math
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

import numpy as np

from ..backends.onnxruntime.runner import NAMESPACE_KEY, SOURCE_KEY, ort_session_options
from ..runtime import default_threads

# Kernels whose multiply-accumulates are counted: out_elements x the reduced dimension.
_MATMUL_OPS = {"MatMul", "Gemm", "FusedMatMul", "MatMulNBits", "MatMulIntegerToFloat", "DynamicQuantizeMatMul",
               "QLinearMatMul", "MatMulInteger", "FusedGemm"}
_CONV_OPS = {"Conv", "FusedConv", "NchwcConv", "QLinearConv", "ConvInteger"}
_ATTENTION_OPS = {"Attention", "GroupQueryAttention", "MultiHeadAttention"}
_ELEMENT_BYTES = {"float": 4, "float16": 2, "bfloat16": 2, "double": 8, "int64": 8, "int32": 4, "int8": 1,
                  "uint8": 1, "bool": 1, "int16": 2, "uint16": 2}


@dataclass
class KernelTime:
    """One kernel ONNX Runtime ran, with what it maps to in the exported graph."""
    name: str                   # node name in ONNX Runtime's optimized graph
    op: str                     # its op type (e.g. FusedConv for a Conv fused with its Relu)
    ms: float                   # mean time per run
    graph_node: str             # the exported graph's node it stands for ('' = unattributed)
    graph_op: str
    module: str                 # dotted module path ('' = the model itself or unknown)
    module_class: str
    source: str                 # 'file.py:123 (code)'
    macs: int
    weight_bytes: int           # bytes of the initializers it reads
    activation_bytes: int       # bytes of its other inputs plus its outputs
    order: int                  # position in execution order
    input_shapes: list = field(default_factory=list)


@dataclass
class Profile:
    kernels: list[KernelTime]
    latency_ms: float           # end-to-end median, no profiler
    latency_spread_ms: float    # half the interquartile range of the end-to-end runs
    runs: int
    threads: int

    @property
    def kernel_ms(self) -> float:
        return sum(k.ms for k in self.kernels)

    @property
    def unmapped_ms(self) -> float:
        return sum(k.ms for k in self.kernels if not k.graph_node)

    def to_json(self) -> dict[str, Any]:
        return {"latency_ms": self.latency_ms, "latency_spread_ms": self.latency_spread_ms, "runs": self.runs,
                "threads": self.threads, "kernel_ms": self.kernel_ms, "unmapped_ms": self.unmapped_ms,
                "kernels": [asdict(k) for k in self.kernels]}


def module_of(namespace: str) -> tuple[str, str]:
    """(dotted module path, class name) of torch.onnx's namespace string
    ': _FlatIO/model: pkg.Net/model.blocks: pkg.Seq/.../fx_node: aten.op'; its last scope is
    the node itself, graphopt's capture wrapper and its 'model.' prefix are dropped."""
    scopes = namespace.split("/")[:-1]
    if not scopes:
        return "", ""
    path, _, cls = scopes[-1].partition(": ")
    path = "" if path == "model" else path.removeprefix("model.")
    return path, cls.rsplit(".", 1)[-1]


def _macs(op: str, shapes: list[list[int]], output_elements: int) -> int:
    if not shapes or not shapes[0]:
        return 0
    if op in _MATMUL_OPS:
        return output_elements * int(shapes[0][-1])
    if op in _CONV_OPS and len(shapes) > 1 and len(shapes[1]) >= 3:
        return output_elements * math.prod(int(d) for d in shapes[1][1:])
    if op in _ATTENTION_OPS and len(shapes) > 1 and shapes[1]:
        q, k = shapes[0], shapes[1]
        if len(q) == 4:                      # [batch, heads, tokens, head_dim]
            return math.prod(q) * int(k[-2]) * 2
        if len(q) == 3 and len(k) == 3:      # [batch, tokens, heads * head_dim]; key [batch, total, kv * dim]
            total = int(k[1])
            if op == "GroupQueryAttention" and len(shapes) > 3 and len(shapes[3]) == 4:
                total = max(total, int(shapes[3][2]))     # past key buffer [batch, kv, capacity, dim]
            return math.prod(q) * total * 2
    return 0


def _shapes_and_bytes(args: Mapping[str, Any]) -> tuple[list[list[int]], int]:
    shapes, input_bytes = [], 0
    for entry in args.get("input_type_shape", []):
        ((dtype, shape),) = entry.items()
        shapes.append([int(d) for d in shape])
        input_bytes += math.prod(shapes[-1]) * _ELEMENT_BYTES.get(dtype, 4)
    return shapes, input_bytes


def _kernel_events(trace: list[dict], warmup: int) -> tuple[dict[str, list[float]], dict[str, dict], list[str]]:
    """Per kernel name: its durations (us) in the timed runs, its args, and first-seen order."""
    runs = sorted(e["ts"] for e in trace if e.get("cat") == "Session" and e.get("name") == "model_run")
    start = runs[warmup] if len(runs) > warmup else 0
    durations: dict[str, list[float]] = {}
    info: dict[str, dict] = {}
    order: list[str] = []
    for e in trace:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time") or e["ts"] < start:
            continue
        name = e["name"].removesuffix("_kernel_time")
        if name not in durations:
            durations[name], info[name] = [], e.get("args", {})
            order.append(name)
        durations[name].append(float(e["dur"]))
    return durations, info, order


class _GraphIndex:
    """The exported graph's nodes by name and by the tensors they produce."""

    def __init__(self, model):
        self.nodes = {n.name: n for n in model.graph.node}
        self.producer = {out: n for n in model.graph.node for out in n.output if out}
        self.meta = {n.name: {p.key: p.value for p in n.metadata_props} for n in model.graph.node}
        self.weight_bytes = self._weight_bytes(model)

    def _weight_bytes(self, model) -> dict[str, int]:
        """Bytes of the constants each node reads (through constant-only producers such as a
        Transpose of a weight), each constant counted at its first reader only."""
        import onnx
        const_bytes = {t.name: math.prod(t.dims) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
                       for t in model.graph.initializer}
        folded: dict[str, set[str]] = {name: {name} for name in const_bytes}   # tensor -> constants it is made of
        for node in model.graph.node:
            sources = [folded.get(i) for i in node.input if i]
            if node.op_type == "Constant" or (sources and all(src is not None for src in sources)):
                made_of = set().union(*sources) if sources else set()
                for out in node.output:
                    folded[out] = made_of
        counted: set[str] = set()
        result = {}
        for node in model.graph.node:
            if all(out in folded for out in node.output if out):
                continue                           # a constant-only node: its reader counts the bytes
            constants = set().union(*(folded.get(i, set()) for i in node.input if i)) - counted
            counted |= constants
            result[node.name] = sum(const_bytes[c] for c in constants)
        return result

    def _by_name(self, name: str):
        parts = name.split("_")
        for cut in range(len(parts), 0, -1):
            stem = "_".join(parts[:cut])
            for candidate in (self.producer.get(stem), self.nodes.get(stem), self.nodes.get("node_" + stem)):
                if candidate is not None:
                    return candidate
        return None

    def resolve(self, name: str, op: str, outputs: list[str], inputs: list[str]):
        """The exported node a kernel stands for, or None."""
        found = [self.producer[o] for o in outputs if o in self.producer]
        if not found and (named := self._by_name(name)) is not None:
            found = [named]
        if not found:
            found = [self.producer[i] for i in inputs if i in self.producer][:1]
        if not found:
            return None
        base = op.removeprefix("Fused").removeprefix("Nchwc")
        frontier, seen = list(found), set()
        for _ in range(4):                     # the fused node's own op among what it replaced
            for node in frontier:
                if node.op_type in (op, base):
                    return node
            seen.update(n.name for n in frontier)
            frontier = [self.producer[i] for n in frontier for i in n.input
                        if i in self.producer and self.producer[i].name not in seen]
        return found[0]


def _random_feed(session, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feed = {}
    for spec in session.get_inputs():
        shape = [d if isinstance(d, int) else 1 for d in spec.shape]
        if "int" in spec.type:
            feed[spec.name] = np.ones(shape, dtype=np.int64 if "int64" in spec.type else np.int32)
        else:
            feed[spec.name] = rng.standard_normal(shape).astype(np.float16 if "float16" in spec.type else np.float32)
    return feed


def end_to_end_ms(model_path: str, feed: Mapping[str, np.ndarray], threads: int, optimization_level: str = "all",
                  runs: int = 20, warmup: int = 3) -> tuple[float, float]:
    """Median and half-IQR of one run's wall time, in ms, without the profiler."""
    import onnxruntime as ort
    session = ort.InferenceSession(model_path, ort_session_options(threads, optimization_level),
                                   providers=["CPUExecutionProvider"])
    for _ in range(warmup):
        session.run(None, dict(feed))
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        session.run(None, dict(feed))
        times.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(times, n=4) if len(times) >= 4 else [min(times), 0, max(times)]
    return statistics.median(times), (q[2] - q[0]) / 2


def interleaved_ms(
    model_paths: list[str],
    feed: Mapping[str, np.ndarray],
    threads: int,
    optimization_level: str = "all",
    runs: int = 30,
    warmup: int = 2,
) -> list[float]:
    """Median wall time (ms) of each model, the models' runs interleaved one by one (in an
    order that alternates every round), so drift of the machine falls on all models alike.
    Thread-pool spinning is off: an idle session's spinning threads slow the running one."""
    import onnxruntime as ort
    sessions = []
    for path in model_paths:
        options = ort_session_options(threads, optimization_level)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sessions.append(ort.InferenceSession(path, options, providers=["CPUExecutionProvider"]))
    for session in sessions:
        for _ in range(warmup):
            session.run(None, dict(feed))
    times: list[list[float]] = [[] for _ in model_paths]
    for round_index in range(runs):
        order = list(range(len(sessions)))
        for i in (order if round_index % 2 == 0 else order[::-1]):
            t0 = time.perf_counter()
            sessions[i].run(None, dict(feed))
            times[i].append((time.perf_counter() - t0) * 1e3)
    return [statistics.median(t) for t in times]


def profile_onnx(model_path: str, feed: Mapping[str, np.ndarray] | None = None, threads: int | None = None,
                 optimization_level: str = "all", runs: int = 10, warmup: int = 3) -> Profile:
    """Time every kernel of `model_path` over `runs` runs (after `warmup`), map each to the
    exported graph, and measure the end-to-end latency without the profiler."""
    import onnx
    import onnxruntime as ort
    threads = threads or default_threads()
    with tempfile.TemporaryDirectory(prefix="graphopt-profile-") as tmp:
        options = ort_session_options(threads, optimization_level)
        options.enable_profiling = True
        options.profile_file_prefix = os.path.join(tmp, "ort")
        options.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", "optimized.data")
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        session = ort.InferenceSession(model_path, options, providers=["CPUExecutionProvider"])
        feed = dict(feed) if feed is not None else _random_feed(session)
        for _ in range(warmup + runs):
            session.run(None, feed)
        with open(session.end_profiling()) as f:
            trace = json.load(f)
        del session                            # timed alone below: a second live session slows the first
        optimized = onnx.load(os.path.join(tmp, "optimized.onnx"), load_external_data=False)
    exported = _GraphIndex(onnx.load(model_path, load_external_data=False))
    optimized_nodes = {n.name: n for n in optimized.graph.node}
    durations, info, order = _kernel_events(trace, warmup)
    kernels = []
    for position, name in enumerate(order):
        args = info[name]
        op = args.get("op_name", "")
        shapes, input_bytes = _shapes_and_bytes(args)
        out_bytes = int(args.get("output_size", 0))
        weight_bytes = int(args.get("parameter_size", 0))
        out_elements = out_bytes // _ELEMENT_BYTES.get(next(iter(args.get("input_type_shape", [{}])[0]), "float"), 4) \
            if args.get("input_type_shape") else 0
        opt = optimized_nodes.get(name)
        node = exported.resolve(name, op, list(opt.output) if opt else [], list(opt.input) if opt else [])
        meta = exported.meta.get(node.name, {}) if node is not None else {}
        weights = exported.weight_bytes.get(node.name, weight_bytes) if node is not None else weight_bytes
        module, module_class = module_of(meta.get(NAMESPACE_KEY, ""))
        kernels.append(
            KernelTime(
                name=name,
                op=op,
                ms=statistics.median(durations[name]) / 1e3 * len(durations[name]) / max(runs, 1),
                graph_node=node.name if node is not None else "",
                graph_op=node.op_type if node is not None else "",
                module=module,
                module_class=module_class,
                source=meta.get(SOURCE_KEY, ""),
                macs=_macs(op, shapes, out_elements),
                weight_bytes=weights,
                activation_bytes=max(input_bytes - max(weights, weight_bytes), 0) + out_bytes,
                order=position,
                input_shapes=shapes,
            )
        )
    latency, spread = end_to_end_ms(model_path, feed, threads, optimization_level, runs=max(runs, 10), warmup=warmup)
    return Profile(kernels, latency, spread, runs, threads)
