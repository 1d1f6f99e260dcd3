"""Reports of what a user has: a compiled model in memory, an artifact directory, or a model
that failed to compile (then the captured graph, with the failing node marked)."""
from __future__ import annotations

import os
import re
from typing import Any, Sequence

from ..artifact import directory_bytes
from ..errors import GraphoptError
from ..runtime import default_threads
from .build import Report, build_report, compare_layers
from .profile import profile_onnx


def _onnx_model_path(executable) -> str:
    if getattr(executable, "backend", None) != "onnxruntime":
        raise GraphoptError(f"report: per-kernel timing is implemented for the onnxruntime backend; "
                            f"'{getattr(executable, 'backend', '?')}' is not supported yet (see README status)")
    return os.path.join(executable.workdir, "model.onnx")


def report_compiled(compiled, title: str | None = None, threads: int | None = None, runs: int = 10,
                    simulate: Sequence[str] = (), apply: bool = False, calibration=None,
                    compare: Report | None = None, progress: bool = True) -> Report:
    """Profile a CompiledModel on its example inputs; optionally simulate (and apply) changes."""
    from .simulate import parse_change, simulate as run_simulation
    if compiled.task is not None:
        raise GraphoptError("report: text-generation artifacts are not supported yet; report the forward model "
                            "(graphopt report smollm2) (see README status)")
    changes = [parse_change(c) for c in simulate]      # bad specs fail before any timing
    threads = threads or default_threads()
    path = _onnx_model_path(compiled.executable)
    feed = {name: value.detach().numpy() for name, value in
            zip(compiled.executable.runner.input_names, compiled.captured.example_inputs)}
    profile = profile_onnx(path, feed, threads, compiled.executable.optimization_level, runs=runs)
    report = build_report(
        title or compiled.captured.source or "model",
        path,
        profile,
        [r.to_json() for r in compiled.records],
        artifact_bytes=directory_bytes(compiled.executable.workdir),
    )
    if changes:
        report.data["simulations"] = run_simulation(compiled.captured, report.data, feed, changes, threads,
                                                    apply=apply, calibration=calibration, progress=progress)
    if compare is not None:
        report.data["compare"] = compare_layers(report, compare)
    return report


def report_artifact(directory: str, threads: int | None = None, runs: int = 10) -> Report:
    """Profile a saved onnxruntime artifact on inputs made from its specs (floats: normal, ints: 1)."""
    from ..artifact import read_manifest, verify_files
    directory = os.path.abspath(directory)
    manifest = read_manifest(directory)
    verify_files(directory, manifest)
    if manifest.get("backend") != "onnxruntime":
        raise GraphoptError(f"report: artifact {directory} is for backend '{manifest.get('backend')}'; per-kernel "
                            "timing is implemented for onnxruntime artifacts only (see README status)")
    if manifest.get("task"):
        raise GraphoptError(f"report: artifact {directory} is a text-generation artifact; reports of those are "
                            "not supported yet (see README status)")
    options = manifest.get("backend_options") or {}
    path = os.path.join(directory, options.get("model", "model.onnx"))
    profile = profile_onnx(
        path, None, threads or default_threads(), options.get("optimization_level", "all"), runs=runs
    )
    return build_report(os.path.basename(directory), path, profile, manifest.get("passes", []),
                        artifact_bytes=directory_bytes(directory))


def _failing_node(gm, message: str) -> str | None:
    """The captured node an error message names (by node name, else by op), if any."""
    names = {n.name for n in gm.graph.nodes}
    for quoted in re.findall(r"'([^']+)'", message):
        if quoted in names:
            return quoted
    overload = re.search(r"op='([\w.]+)', overload='(\w+)'", message)      # torch.onnx's DispatchError
    if overload:
        message = f"{overload.group(1)}.{overload.group(2)} {message}"
    for node in gm.graph.nodes:
        target = getattr(node.target, "__name__", str(node.target))
        overload = str(node.target)
        if node.op == "call_function" and (overload in message or re.search(rf"\b{re.escape(target)}\b", message)):
            return node.name
    return None


def captured_graph_nodes(gm) -> list[dict[str, Any]]:
    """The graph view's nodes from a captured fx graph (module paths and source lines from its meta)."""
    from ..ir.graph import module_path, op_name, source_line
    index, nodes = {}, []
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_module", "call_method"):
            continue
        index[node.name] = len(nodes)
        stack = node.meta.get("nn_module_stack") or {}
        cls = list(stack.values())[-1][1].rsplit(".", 1)[-1] if stack else ""
        nodes.append({"name": node.name, "op": op_name(node), "module": module_path(node), "module_class": cls,
                      "source": source_line(node), "ms": 0.0,
                      "inputs": sorted({index[a.name] for a in node.all_input_nodes if a.name in index})})
    return nodes


def failure_report(model, example_inputs, error: GraphoptError, backend: str = "onnxruntime",
                   title: str | None = None, dynamic_dims=None) -> Report:
    """A report of what was captured of a model whose compile failed with `error`: the graph,
    the error, and the node it names marked."""
    from ..frontend.torch_export import capture
    message = str(error)
    title = title or (model if isinstance(model, str) else type(model).__name__)
    try:
        captured = capture(model, example_inputs, dynamic_dims)
    except GraphoptError as capture_error:
        return build_report(title, None, None, [], backend=backend,
                            error={"stage": "capture", "message": str(capture_error), "node": None})
    gm = captured.graph_module
    return build_report(title, None, None, [], backend=backend, graph_nodes=captured_graph_nodes(gm),
                        error={"stage": type(error).__name__, "message": message, "node": _failing_node(gm, message)})


def report_failure(model, example_inputs, passes="default", backend: str = "onnxruntime",
                   title: str | None = None, **compile_options) -> Report:
    """Compile and report; when compiling fails, the failure report (failure_report)."""
    from ..api import compile as compile_model
    try:
        compiled = compile_model(model, example_inputs, passes=passes, backend=backend, **compile_options)
    except GraphoptError as exc:
        return failure_report(model, example_inputs, exc, backend, title, compile_options.get("dynamic_dims"))
    return report_compiled(compiled, title=title)
