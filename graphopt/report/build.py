"""The report's data: measured kernels rolled up by module and layer, the exported graph for the
graph view, the pass log, and totals that add up to the end-to-end latency.

Everything here is plain JSON (`Report.data`), so the HTML page and `--json` show the same
numbers. Kernel times come from ONNX Runtime's profiler, which costs some microseconds per
kernel; when the kernels add up to more than the end-to-end latency measured without it,
each kernel's share of the latency is scaled to fit (`profiler_scale`), and what the kernels
do not cover is reported as unattributed.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import re
from dataclasses import dataclass
from typing import Any

from .profile import NAMESPACE_KEY, SOURCE_KEY, Profile, module_of

_LAYER = re.compile(r"^(.*?\.\d+)(\.|$)")


def layer_of(module: str) -> str:
    """The repeated block a module belongs to ('layers.3' for 'layers.3.mlp.up_proj'), else its
    first path component ('' for the model itself)."""
    match = _LAYER.match(module)
    return match.group(1) if match else module.split(".", 1)[0]


def _ancestors(module: str) -> list[str]:
    parts = module.split(".") if module else []
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _graph_view(model) -> dict[str, Any]:
    """The exported graph's nodes (topological order) with module paths and producer edges."""
    producer, nodes = {}, []
    for index, node in enumerate(model.graph.node):
        for out in node.output:
            producer[out] = index
    for index, node in enumerate(model.graph.node):
        meta = {p.key: p.value for p in node.metadata_props}
        module, cls = module_of(meta.get(NAMESPACE_KEY, ""))
        nodes.append({"name": node.name, "op": node.op_type, "module": module, "module_class": cls,
                      "source": meta.get(SOURCE_KEY, ""),
                      "inputs": sorted({producer[i] for i in node.input if i in producer})})
    return {"nodes": nodes}


def _module_classes(graph_nodes: list[dict]) -> dict[str, str]:
    """module path -> class name, from the namespace strings of the nodes inside it."""
    classes: dict[str, str] = {}
    for node in graph_nodes:
        if node["module"]:
            classes.setdefault(node["module"], node["module_class"])
    return classes


def _rollup(kernels: list[dict], classes: dict[str, str]) -> list[dict]:
    """One row per module at every depth (and the model itself as ''): summed costs."""
    rows: dict[str, dict] = {}
    for k in kernels:
        for path in [""] + _ancestors(k["module"]):
            row = rows.setdefault(path, {"module": path, "module_class": classes.get(path, ""),
                                         "depth": path.count(".") + 1 if path else 0,
                                         "parent": path.rsplit(".", 1)[0] if "." in path else ("" if path else None),
                                         "kernels": 0, "ms": 0.0, "measured_ms": 0.0, "macs": 0,
                                         "weight_bytes": 0, "activation_bytes": 0})
            row["kernels"] += 1
            for key in ("ms", "measured_ms", "macs", "weight_bytes", "activation_bytes"):
                row[key] += k[key]
    return sorted(rows.values(), key=lambda r: (r["depth"], r["module"]))


def _layers(kernels: list[dict]) -> list[dict]:
    rows: dict[str, dict] = {}
    for k in kernels:
        name = layer_of(k["module"]) or "(model)"
        row = rows.setdefault(name, {"layer": name, "ms": 0.0, "macs": 0, "weight_bytes": 0, "first": k["order"]})
        row["ms"] += k["ms"]
        row["macs"] += k["macs"]
        row["weight_bytes"] += k["weight_bytes"]
    return sorted(rows.values(), key=lambda r: r["first"])


def _pass_log(records: list[dict]) -> list[dict]:
    keys = ("name", "modified", "seconds", "nodes_before", "nodes_after", "bytes_before", "bytes_after",
            "macs_before", "macs_after", "changes", "quality", "max_output_diff")
    return [{k: r.get(k) for k in keys} for r in records]


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@dataclass
class Report:
    """What a report shows, as JSON-ready data; `write_html` and `write_json` save it."""
    data: dict[str, Any]

    def write_json(self, path: str) -> str:
        with open(path, "w") as f:
            json.dump(self.data, f, indent=1)
        return path

    def write_html(self, path: str) -> str:
        from .html import render
        with open(path, "w", encoding="utf-8") as f:
            f.write(render(self.data))
        return path

    @property
    def latency_ms(self) -> float:
        return self.data["totals"]["latency_ms"]


def build_report(title: str, model_path: str | None, profile: Profile | None, records: list[dict],
                 backend: str = "onnxruntime", error: dict | None = None, graph_nodes: list[dict] | None = None,
                 artifact_bytes: int | None = None, extra: dict | None = None) -> Report:
    """Assemble the report from a profile of the exported model (None when it could not be
    compiled: then `graph_nodes` is what was captured and `error` says what failed)."""
    if model_path is not None:
        import onnx
        graph = _graph_view(onnx.load(model_path, load_external_data=False))
    else:
        graph = {"nodes": graph_nodes or []}
    kernels: list[dict] = []
    totals: dict[str, Any] = {"latency_ms": None, "latency_spread_ms": None, "kernel_ms": None,
                              "profiler_scale": None, "attributed_ms": None, "unattributed_ms": None,
                              "unmapped_kernel_ms": None, "kernels": 0, "macs": 0, "weight_bytes": 0,
                              "graph_nodes": len(graph["nodes"]), "artifact_bytes": artifact_bytes}
    if profile is not None:
        raw = profile.kernel_ms
        scale = min(1.0, profile.latency_ms / raw) if raw > 0 else 1.0
        index_of = {n["name"]: i for i, n in enumerate(graph["nodes"])}
        for k in profile.kernels:
            row = {"name": k.name, "op": k.op, "ms": k.ms * scale, "measured_ms": k.ms,
                   "share": k.ms * scale / profile.latency_ms if profile.latency_ms else 0.0,
                   "graph_node": k.graph_node, "graph_index": index_of.get(k.graph_node), "graph_op": k.graph_op,
                   "module": k.module, "module_class": k.module_class, "layer": layer_of(k.module),
                   "source": k.source, "macs": k.macs, "weight_bytes": k.weight_bytes,
                   "activation_bytes": k.activation_bytes, "order": k.order}
            kernels.append(row)
        attributed = sum(k["ms"] for k in kernels)
        totals.update(latency_ms=profile.latency_ms, latency_spread_ms=profile.latency_spread_ms, kernel_ms=raw,
                      profiler_scale=scale, attributed_ms=attributed,
                      unattributed_ms=profile.latency_ms - attributed,
                      unmapped_kernel_ms=sum(k["ms"] for k in kernels if not k["graph_node"]),
                      kernels=len(kernels), macs=sum(k["macs"] for k in kernels),
                      weight_bytes=sum(k["weight_bytes"] for k in kernels))
        for node in graph["nodes"]:
            node["ms"] = 0.0
        for k in kernels:
            if k["graph_index"] is not None:
                graph["nodes"][k["graph_index"]]["ms"] += k["ms"]
    data = {
        "title": title, "backend": backend,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": _cpu_name(), "cores": os.cpu_count(),
                    "threads": profile.threads if profile else None, "runs": profile.runs if profile else None},
        "totals": totals, "kernels": kernels,
        "modules": _rollup(kernels, _module_classes(graph["nodes"])), "layers": _layers(kernels),
        "graph": graph, "passes": _pass_log(records), "error": error,
        "simulations": [], "compare": None,
    }
    data.update(extra or {})
    return Report(data)


def compare_layers(a: Report, b: Report) -> dict[str, Any]:
    """Per layer, time and weight bytes of two reports side by side (e.g. fp32 vs int4)."""
    rows: dict[str, dict] = {}
    for side, report in (("a", a), ("b", b)):
        for layer in report.data["layers"]:
            row = rows.setdefault(layer["layer"], {"layer": layer["layer"], "first": layer["first"],
                                                   "ms_a": None, "ms_b": None, "bytes_a": None, "bytes_b": None})
            row[f"ms_{side}"] = layer["ms"]
            row[f"bytes_{side}"] = layer["weight_bytes"]
    ordered = sorted(rows.values(), key=lambda r: r["first"])
    return {"a": a.data["title"], "b": b.data["title"],
            "latency_ms_a": a.latency_ms, "latency_ms_b": b.latency_ms,
            "bytes_a": a.data["totals"]["weight_bytes"], "bytes_b": b.data["totals"]["weight_bytes"],
            "layers": ordered}
