"""Simulate a change before applying it: predicted latency and bytes from this model's measured
kernel times, and (apply) the change compiled and measured beside the prediction.

A change is one of
    int4:PATTERN / int8:PATTERN   weight-only quantization of the linear layers whose module path
                                  matches the fnmatch PATTERN (group 32 for int4, per channel for int8)
    drop:NAME[,NAME...]           remove these residual sublayers (names as `graphopt sublayers` lists)
    prune:RATIO                   drop RATIO of every consumer's input channels (L1 importance)
    heads:RATIO                   drop RATIO of every attention's key/value groups (L2 importance)

The pass runs on a copy of the captured graph (seconds: no lowering), which gives the new
graph's exact weight bytes and, per module, its multiply-accumulates and activation sizes.
Each measured kernel is then predicted from its module's new size with a per-op-type affine
cost model, `ms = fixed + per_unit * size` (size: MACs for matmuls, convolutions and attention,
activation bytes for the rest), fitted by least squares to this model's kernels of that op
type. A kernel whose module has no nodes left costs nothing; a linear layer that becomes a
quantized matmul costs its measured float kernel times the ratio of ONNX Runtime's
MatMulNBits kernels (at the layers' shapes and attributes) to the float MatMuls they replace,
both timed on this machine, interleaved, in one graph each. Framework time between kernels scales with the kernel count.
"""
from __future__ import annotations

import copy
import os
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch
import torch.fx as fx

from ..analysis.cost import node_macs
from ..errors import GraphoptError
from ..ir.graph import module_path, parameter_bytes
from ..ir.quantized import MATMUL_NBITS

KINDS = ("int4", "int8", "drop", "prune", "heads")


@dataclass
class Change:
    kind: str
    value: str

    @property
    def text(self) -> str:
        return f"{self.kind}:{self.value}"

    def passes(self):
        from ..passes import AttentionHeadPruning, ChannelPruning, LayerSkipping, WeightQuantization
        if self.kind in ("int4", "int8"):
            bits = int(self.kind[3])
            group = 32 if bits == 4 else None
            chosen = {self.value: (bits, group)} if self.value == "*" else {self.value: (bits, group), "*": None}
            return [WeightQuantization(bits=bits, group_size=group, method="rtn", embeddings=False, head_bits=None,
                                       layer_overrides=chosen)]
        if self.kind == "drop":
            return [LayerSkipping(remove=tuple(n for n in self.value.split(",") if n), progress=False)]
        if self.kind == "prune":
            return [ChannelPruning(ratio=float(self.value), importance="l1")]
        return [AttentionHeadPruning(ratio=float(self.value), importance="l2", scope="layer", progress=False)]

    def describe(self) -> str:
        return {"int4": f"int4 g32 weights on layers {self.value}", "int8": f"int8 weights on layers {self.value}",
                "drop": f"remove sublayers {self.value}", "prune": f"drop {self.value} of input channels",
                "heads": f"drop {self.value} of key/value groups per attention"}[self.kind]


def parse_change(text: str) -> Change:
    """'int4:model.layers.*' -> Change; a one-line error names what is wrong."""
    kind, sep, value = text.partition(":")
    if not sep or kind not in KINDS or not value:
        raise GraphoptError(f"change '{text}': expected KIND:VALUE with KIND one of {', '.join(KINDS)} "
                            "(int4:PATTERN, int8:PATTERN, drop:NAME[,NAME], prune:RATIO, heads:RATIO)")
    if kind in ("prune", "heads"):
        try:
            ratio = float(value)
        except ValueError:
            raise GraphoptError(f"change '{text}': {value!r} is not a ratio") from None
        if not 0.0 < ratio < 1.0:
            raise GraphoptError(f"change '{text}': the ratio must be in (0, 1), got {ratio}")
    return Change(kind, value)


def apply_change(gm: fx.GraphModule, example_inputs, change: Change, calibration=None) -> tuple[fx.GraphModule, list]:
    """The change's pass run on a copy of `gm` (the original is untouched)."""
    from ..passes import PassContext, PassManager
    result = PassManager(change.passes(), [], progress=False).run(
        copy.deepcopy(gm), PassContext(tuple(example_inputs), calibration=calibration))
    if not any(r.modified for r in result.records):
        raise GraphoptError(f"change '{change.text}' changes nothing in this model "
                            f"({'; '.join(n for r in result.records for n in r.notes) or 'no matching layers'})")
    return result.graph_module, result.records


@dataclass
class ModuleSize:
    macs: int = 0
    activation_bytes: int = 0
    nodes: int = 0


def module_sizes(gm: fx.GraphModule) -> dict[str, ModuleSize]:
    """Per module path: MACs, output bytes of its nodes and their count (call_function nodes)."""
    sizes: dict[str, ModuleSize] = defaultdict(ModuleSize)
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        size = sizes[module_path(node)]
        size.nodes += 1
        size.macs += node_macs(node, gm)
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            size.activation_bytes += val.numel() * val.element_size()
    return dict(sizes)


def _size(kernel: dict) -> float:
    return float(kernel["macs"] or kernel["activation_bytes"])


def fit_cost_model(kernels: list[dict]) -> dict[str, tuple[float, float]]:
    """Per (op type, size kind): (fixed ms, ms per unit of size), least squares, fixed >= 0."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for k in kernels:
        groups[k["op"] + ("/macs" if k["macs"] else "/bytes")].append(k)
    model = {}
    for key, group in groups.items():
        x = np.array([_size(k) for k in group])
        y = np.array([k["ms"] for k in group])
        if len(set(x.tolist())) >= 2:
            slope, fixed = np.polyfit(x, y, 1)
            if fixed < 0 or slope < 0:
                fixed, slope = 0.0, float(y.sum() / max(x.sum(), 1e-12))
        else:
            fixed, slope = 0.0, float(y.mean() / max(x.mean(), 1e-12))
        model[key] = (float(min(fixed, y.min())), float(slope))
    return model


def _nbits_over_float_ratio(nodes: list[fx.Node], gm: fx.GraphModule, threads: int) -> float:
    """Time of the MatMulNBits kernels of these nodes over the float MatMuls they replace, each
    kernel with its own random weights at its shapes and attributes, run one after another in
    one ONNX Runtime graph per kind, the two graphs' runs interleaved: a ratio, so that it holds
    against a profile taken at another moment on a machine whose speed drifts."""
    import onnx
    from onnx import TensorProto, helper

    from ..ir.graph import constant_value
    from .profile import interleaved_ms
    rng = np.random.default_rng(0)
    graphs: dict[str, tuple[list, list]] = {"nbits": ([], []), "float": ([], [])}
    graph_inputs, outputs, feed = {}, [], {}

    def tensor(name, dtype, shape, values):
        return helper.make_tensor(name, dtype, shape, values.tobytes(), raw=True)

    for i, node in enumerate(nodes):
        x, packed, scales, zero_points = (node.args[0], *(constant_value(gm, a) for a in node.args[1:4]))
        bits, block_size, k, accuracy_level = node.args[4:8]
        rows, n = int(np.prod(x.meta["val"].shape[:-1])), packed.shape[0]
        a = f"A_{rows}x{k}"
        if a not in graph_inputs:
            graph_inputs[a] = helper.make_tensor_value_info(a, TensorProto.FLOAT, [rows, k])
            feed[a] = rng.standard_normal((rows, k)).astype(np.float32)
        nbits_nodes, nbits_inits = graphs["nbits"]
        nbits_inits += [tensor(f"B{i}", TensorProto.UINT8, packed.shape, rng.integers(0, 255, packed.shape, np.uint8)),
                        tensor(f"scales{i}", TensorProto.FLOAT, scales.shape,
                               rng.random(scales.shape, dtype=np.float32) * 0.01)]
        inputs = [a, f"B{i}", f"scales{i}"]
        if zero_points.numel():
            nbits_inits.append(tensor(f"zp{i}", TensorProto.UINT8, zero_points.shape,
                                      np.full(zero_points.shape, 0x88, np.uint8)))
            inputs.append(f"zp{i}")
        nbits_nodes.append(helper.make_node("MatMulNBits", inputs, [f"Y{i}"], domain="com.microsoft", K=k, N=n,
                                            bits=bits, block_size=block_size, accuracy_level=accuracy_level))
        float_nodes, float_inits = graphs["float"]
        float_inits.append(tensor(f"W{i}", TensorProto.FLOAT, [k, n], rng.standard_normal((k, n), np.float32) * 0.02))
        float_nodes.append(helper.make_node("MatMul", [a, f"W{i}"], [f"Y{i}"]))
        outputs.append(helper.make_tensor_value_info(f"Y{i}", TensorProto.FLOAT, [rows, n]))
    with tempfile.TemporaryDirectory(prefix="graphopt-kernel-") as tmp:
        paths = []
        for kind, (graph_nodes, inits) in graphs.items():
            graph = helper.make_graph(graph_nodes, kind, list(graph_inputs.values()), outputs, initializer=inits)
            model = helper.make_model(
                graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
            )
            paths.append(os.path.join(tmp, f"{kind}.onnx"))
            onnx.save(model, paths[-1], save_as_external_data=True, location=f"{kind}.onnx.data")
        nbits_ms, float_ms = interleaved_ms(paths, feed, threads, runs=20)
    return nbits_ms / float_ms


def _match_mac_nodes(kernels: list[dict], gm: fx.GraphModule) -> dict[int, str]:
    """Kernel order -> the captured node it computes, for kernels with MACs: paired in execution
    order with the graph's nodes of equal MACs (a fused kernel's module path may be another
    node's, e.g. a Conv fused with its BatchNorm carries the norm's)."""
    candidates = [(n.name, m) for n in gm.graph.nodes if n.op == "call_function" and (m := node_macs(n, gm))]
    matched, start = {}, 0
    for k in kernels:
        if not k["macs"]:
            continue
        for i in range(start, len(candidates)):
            if candidates[i][1] == k["macs"]:
                matched[k["order"]] = candidates[i][0]
                start = i + 1
                break
    return matched


def predict(report: dict, gm_before: fx.GraphModule, gm_after: fx.GraphModule, threads: int) -> dict:
    """Predicted latency (ms) and weight bytes of `gm_after`, from the report of `gm_before`."""
    kernels = report["kernels"]
    model = fit_cost_model(kernels)
    before, after = module_sizes(gm_before), module_sizes(gm_after)
    nodes_before = {n.name: n for n in gm_before.graph.nodes}
    nodes_after = {n.name: n for n in gm_after.graph.nodes}
    matched = _match_mac_nodes(kernels, gm_before)
    quantized: dict[str, list[fx.Node]] = defaultdict(list)
    for node in gm_after.graph.find_nodes(op="call_function", target=MATMUL_NBITS):
        quantized[module_path(node)].append(node)
    quantized_nodes = [n for nodes in quantized.values() for n in nodes]
    ratio_nbits = _nbits_over_float_ratio(quantized_nodes, gm_after, threads) if quantized_nodes else 1.0
    predicted, kept = 0.0, 0
    for k in kernels:
        node_name = matched.get(k["order"])
        module = module_path(nodes_before[node_name]) if node_name else k["module"]
        module = module if module in before else ""
        old, new = before.get(module), after.get(module)
        if node_name and node_name not in nodes_after and module not in quantized and (new is None or not new.macs):
            continue                                           # its node is gone
        if not node_name and old is not None and (new is None or new.nodes == 0):
            continue                                           # the module is gone
        kept += 1
        if k["macs"] and module in quantized:
            predicted += k["ms"] * ratio_nbits
            continue
        if node_name and node_name in nodes_after:
            old_macs = node_macs(nodes_before[node_name], gm_before)
            ratio = node_macs(nodes_after[node_name], gm_after) / old_macs if old_macs else 1.0
        elif old is None or new is None:
            ratio = 1.0
        elif k["macs"]:
            ratio = new.macs / old.macs if old.macs else 1.0
        else:
            ratio = new.activation_bytes / old.activation_bytes if old.activation_bytes else 1.0
        fixed, _ = model[k["op"] + ("/macs" if k["macs"] else "/bytes")]
        predicted += fixed + (k["ms"] - fixed) * ratio
    added = _added_nodes(gm_before, gm_after, set(quantized))
    overall = fit_cost_model([dict(k, op="*") for k in kernels])
    added_ms = 0.0
    for node in added:
        macs, size = node_macs(node, gm_after), _output_bytes(node)
        fixed, slope = overall["*/macs"] if macs and "*/macs" in overall else overall.get("*/bytes", (0.0, 0.0))
        added_ms += fixed + slope * (macs or size)
    predicted += added_ms
    kept += len(added)
    totals = report["totals"]
    framework = totals["unattributed_ms"] * (kept / max(len(kernels), 1))
    return {"predicted_ms": predicted + framework, "predicted_bytes": parameter_bytes(gm_after),
            "kernels_kept": kept, "nodes_added": len(added), "added_ms": added_ms}


_FREE_OPS = {torch.ops.aten.view.default, torch.ops.aten.reshape.default, torch.ops.aten._unsafe_view.default,
             torch.ops.aten.unsqueeze.default, torch.ops.aten.squeeze.dim, torch.ops.aten.alias.default}


def _output_bytes(node: fx.Node) -> int:
    val = node.meta.get("val")
    return val.numel() * val.element_size() if isinstance(val, torch.Tensor) else 0


def _added_nodes(gm_before: fx.GraphModule, gm_after: fx.GraphModule, quantized: set[str]) -> list[fx.Node]:
    """Computing nodes the change inserted (new names outside the quantized modules, views excluded)."""
    names = {n.name for n in gm_before.graph.nodes}
    return [n for n in gm_after.graph.nodes if n.op == "call_function" and n.name not in names
            and n.target not in _FREE_OPS and module_path(n) not in quantized]


def measure(captured, gm_after: fx.GraphModule, feed: dict, threads: int, runs: int) -> dict:
    """Lower `gm_after` and the unchanged graph to ONNX Runtime the same way; time both, their
    runs interleaved. (The unchanged model is exported again rather than the report's file
    reused: two exports of one graph can lay weights out differently, measured 5% apart.)"""
    from ..backends.onnxruntime.lower import MODEL_FILE, export_onnx
    from .profile import interleaved_ms
    with tempfile.TemporaryDirectory(prefix="graphopt-apply-") as tmp:
        paths = {}
        for label, gm in (("baseline", copy.deepcopy(captured.graph_module)), ("changed", gm_after)):
            os.makedirs(os.path.join(tmp, label))
            paths[label] = os.path.join(tmp, label, MODEL_FILE)
            lowered = copy.copy(captured)
            lowered.graph_module = gm
            t0 = time.perf_counter()
            export_onnx(lowered, paths[label])
            seconds = time.perf_counter() - t0
        baseline_ms, measured_ms = interleaved_ms([paths["baseline"], paths["changed"]], feed, threads, runs=runs)
        changed_dir = os.path.dirname(paths["changed"])
        stored = sum(os.path.getsize(os.path.join(changed_dir, f)) for f in os.listdir(changed_dir) if f != MODEL_FILE)
    return {"baseline_now_ms": baseline_ms, "measured_ms": measured_ms, "measured_bytes": stored,
            "lower_seconds": seconds}


def simulate(captured, report: dict, feed: dict, changes: list[Change], threads: int,
             apply: bool = False, calibration=None, runs: int = 30, progress: bool = True) -> list[dict]:
    """One row per change: predicted (and with `apply`, measured) latency and bytes.

    With `apply`, the unchanged model is timed again beside the changed one, and the prediction
    is the cost model's ratio to the report's latency times that fresh baseline: the machine's
    drift between the report's measurement and this one is not a prediction error."""
    from tqdm.auto import tqdm
    rows = []
    baseline = report["totals"]["latency_ms"]
    for change in tqdm(changes, desc="simulate", unit="change", disable=not progress, leave=False):
        t0 = time.perf_counter()
        gm_after, records = apply_change(captured.graph_module, captured.example_inputs, change, calibration)
        row = {"kind": change.kind, "change": change.text, "description": change.describe(),
               "changes": [c for r in records for c in r.changes][:20],
               "baseline_ms": baseline, "baseline_bytes": parameter_bytes(captured.graph_module),
               **predict(report, captured.graph_module, gm_after, threads),
               "measured_ms": None, "measured_bytes": None, "error": None}
        row["predicted_ratio"] = row["predicted_ms"] / baseline
        row["simulate_seconds"] = time.perf_counter() - t0
        if apply:
            row.update(measure(captured, gm_after, feed, threads, runs))
            row["predicted_ms"] = row["predicted_ratio"] * row["baseline_now_ms"]
            row["baseline_ms"] = row["baseline_now_ms"]
            row["error"] = (row["predicted_ms"] - row["measured_ms"]) / row["measured_ms"]
        rows.append(row)
    return rows
