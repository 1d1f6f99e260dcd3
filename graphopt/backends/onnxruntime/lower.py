"""ONNX Runtime backend: IR -> torch.export -> torch.onnx (dynamo exporter, with our own
translations for graphopt ops) -> an InferenceSession with ORT's optimizations on."""
from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import tempfile
import warnings

import torch

from ...errors import BackendError, UnsupportedOpError
from ...frontend.torch_export import CapturedModel
from ...ir.graph import export_retrying_with_reshapes, format_source
from ..base import Backend, WorkdirExecutable
from .runner import MODEL_FILE, NAMESPACE_KEY, SOURCE_KEY, OrtRunner
from .translations import TRANSLATIONS

# torch.onnx warns at every export that torchvision (which we never use) is missing.
logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)

# Opset 23 has Attention (GQA, causal) and RMSNormalization, which ONNX Runtime runs as
# single kernels (measured: docs/measurements/decisions.md).
DEFAULT_OPSET = 23

# graphopt's own ops (torch.library) -> onnxscript functions: every op a pass inserts lowers
# through one rule here. Users may add entries for their own ops.
CUSTOM_TRANSLATIONS: dict = dict(TRANSLATIONS)


class OrtExecutable(WorkdirExecutable):
    backend = "onnxruntime"

    def __init__(self, workdir: str, captured: CapturedModel, threads: int | None, optimization_level: str):
        self.workdir = workdir
        self.threads = threads
        self.optimization_level = optimization_level
        self.runner = OrtRunner(os.path.join(workdir, MODEL_FILE), captured.inputs, captured.outputs,
                                threads, optimization_level)

    def save_files(self, directory):
        self.copy_files(directory)
        return {"model": MODEL_FILE, "threads": self.threads, "optimization_level": self.optimization_level}


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def __init__(self, threads: int | None = None, optimization_level: str = "all", opset: int | None = DEFAULT_OPSET):
        self.threads = threads
        self.optimization_level = optimization_level
        self.opset = opset

    def compile(self, captured, progress=False, calibration=None):
        workdir = tempfile.mkdtemp(prefix="graphopt-ort-")
        try:
            export_onnx(captured, os.path.join(workdir, MODEL_FILE), self.opset)
            return OrtExecutable(workdir, captured, self.threads, self.optimization_level)
        except BaseException:
            shutil.rmtree(workdir, ignore_errors=True)
            raise


def export_onnx(captured: CapturedModel, path: str, opset: int | None = None) -> None:
    """Write the IR as ONNX with weights in one external data file beside it."""
    gm = captured.graph_module
    if _broadcast_attention_heads(gm):
        gm.recompile()
    kwargs = dict(dynamo=True, optimize=False, verbose=False, external_data=True,
                  input_names=[s.name for s in captured.inputs],
                  output_names=[s.name for s in captured.outputs],
                  custom_translation_table=CUSTOM_TRANSLATIONS)
    if opset:
        kwargs["opset_version"] = opset
    if captured.dynamic_dims:
        kwargs["dynamic_shapes"] = captured.dynamic_shapes()
    quiet = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(quiet):
            warnings.simplefilter("ignore")
            program = export_retrying_with_reshapes(gm, lambda: torch.onnx.export(gm, captured.example_inputs,
                                                                                  **kwargs))
            _optimize_without_growing(program.model)
            _keep_module_paths_only(program.model)
            program.save(path, external_data=True)
    except Exception as exc:
        message = str(exc)
        unsupported = _unsupported_op(message)
        if unsupported:
            raise UnsupportedOpError(f"onnxruntime backend: no ONNX translation for {unsupported}; "
                                     "register one in graphopt.backends.onnxruntime.lower.CUSTOM_TRANSLATIONS") from exc
        first = message.strip().splitlines()[0] if message.strip() else type(exc).__name__
        raise BackendError(f"ONNX export failed: {first}") from exc


# Largest constant (elements) the exporter's optimizer may fold into, or fold away: a fold of
# a bigger one (an fp32 cast of fp16 scales, rotary tables computed from their frequencies)
# stays a node, which ONNX Runtime folds when the session loads, so the file stays small.
# (The optimizer counts elements, not bytes: an fp16 -> fp32 cast looks free to it.)
STORED_FOLD_LIMIT = 1024


def _optimize_without_growing(model) -> None:
    """torch.onnx's optimize=True (onnxscript's constant folding and fusions), with folded
    constants and the constants they replace capped at STORED_FOLD_LIMIT elements."""
    import onnxscript.optimizer
    import onnxscript.rewriter.onnx_fusions
    onnxscript.optimizer.optimize_ir(model, input_size_limit=STORED_FOLD_LIMIT, output_size_limit=STORED_FOLD_LIMIT)
    onnxscript.rewriter.onnx_fusions.fuse(model)


# Per-node metadata torch.onnx writes; all but the module path ("namespace") repeat what the
# manifest and the IR hold, and most of the graph file's bytes. The stack trace is
# kept as one line, SOURCE_KEY: the model's own source line (graphopt.report shows it), and
# the namespace as its innermost module scope and the node (all that graphopt.report reads).
_DROPPED_METADATA = ("pkg.torch.onnx.stack_trace", "pkg.torch.onnx.class_hierarchy", "pkg.torch.onnx.name_scopes",
                     "pkg.torch.onnx.fx_node", "pkg.onnxscript.rewriter.rule_name")


def _keep_module_paths_only(model) -> None:
    """Drop the bulky per-node metadata of an onnx_ir model in place (see _DROPPED_METADATA)."""
    def strip(graph):
        for node in graph:
            source = format_source(node.metadata_props.get("pkg.torch.onnx.stack_trace") or "")
            if source:
                node.metadata_props[SOURCE_KEY] = source
            for key in _DROPPED_METADATA:
                node.metadata_props.pop(key, None)
            namespace = node.metadata_props.get(NAMESPACE_KEY)
            if namespace:
                node.metadata_props[NAMESPACE_KEY] = innermost_scope(namespace)
            for attr in node.attributes.values():
                if attr.type.name == "GRAPH":
                    strip(attr.value)
    strip(model.graph)
    for function in model.functions.values():
        strip(function)


def innermost_scope(namespace: str) -> str:
    """torch.onnx's namespace ': _FlatIO/model: pkg.Net/.../model.blocks.0: pkg.Block/add_3: aten.add'
    shortened to its innermost module scope and the node: 'model.blocks.0: pkg.Block/add_3: aten.add'."""
    return "/".join(namespace.split("/")[-2:])


def _broadcast_attention_heads(gm: torch.fx.GraphModule) -> bool:
    """Multi-query attention written as broadcasting (Falcon: one key/value head for all query
    heads) is valid in torch, but torch.onnx's Attention translation asserts equal head counts.
    One shared head becomes enable_gqa=True (the same values; ORT's Attention runs it as MQA);
    any other broadcast of the leading dims becomes an explicit expand. In place, exact."""
    aten, changed = torch.ops.aten, False
    for node in gm.graph.find_nodes(op="call_function", target=aten.scaled_dot_product_attention.default):
        query, key, value = (getattr(arg, "meta", {}).get("val") for arg in node.args[:3])
        if query is None or key is None or value is None or query.dim() != 4:
            continue
        lead = tuple(query.shape[:2])
        if node.kwargs.get("enable_gqa") or (tuple(key.shape[:2]) == lead and tuple(value.shape[:2]) == lead):
            continue
        if key.shape[0] == value.shape[0] == query.shape[0] and key.shape[1] == value.shape[1] == 1:
            node.kwargs = {**node.kwargs, "enable_gqa": True}
            changed = True
            continue
        for position, val in ((1, key), (2, value)):
            if tuple(val.shape[:2]) == lead:
                continue
            with gm.graph.inserting_before(node):
                expanded = gm.graph.call_function(aten.expand.default, (node.args[position], [*lead, -1, -1]))
            expanded.meta["val"] = val.expand(*lead, -1, -1)
            node.update_arg(position, expanded)
            changed = True
    return changed


def _unsupported_op(message: str) -> str | None:
    for line in message.splitlines():
        if "No decompositions registered" in line or "is not supported" in line or "Unsupported FX nodes" in line:
            return line.strip()
    return None
