"""Helpers over the IR (a torch.fx GraphModule): constants, node descriptions, metadata."""
from __future__ import annotations

import hashlib
import os
import re
from typing import Callable, TypeVar

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode

from . import ops

T = TypeVar("T")


def fetch_attr(gm: fx.GraphModule, target: str):
    """The tensor (or module) a get_attr target names."""
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def storage_identity(tensor: torch.Tensor) -> int:
    """Equal for tensors that share data (a weight and its transpose, tied weights). Meta
    tensors (streamed weights, graphopt.ir.lazy) have no data address: their base's id."""
    if tensor.is_meta:
        return id(tensor._base if tensor._base is not None else tensor)
    return tensor.data_ptr()


def constant_value(gm: fx.GraphModule, node) -> torch.Tensor | None:
    """The tensor behind a get_attr node, or None if `node` is not a constant tensor."""
    if isinstance(node, fx.Node) and node.op == "get_attr":
        value = fetch_attr(gm, node.target)
        if isinstance(value, torch.Tensor):
            return value
    return None


def add_constant(gm: fx.GraphModule, hint: str, value: torch.Tensor) -> str:
    """Register `value` as a buffer on `gm` under a fresh name derived from `hint`."""
    base = re.sub(r"[^0-9A-Za-z_]", "_", hint) or "const"
    name, i = base, 0
    while hasattr(gm, name):
        i += 1
        name = f"{base}_{i}"
    gm.register_buffer(name, value.detach().contiguous())
    return name


def remove_unused_attributes(gm: fx.GraphModule) -> int:
    """Delete parameters/buffers that no get_attr node reads; returns how many went."""
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    removed = 0
    for name, _ in list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False)):
        owner_path, _, leaf = name.rpartition(".")
        if name in used or any(owner_path == u or owner_path.startswith(u + ".") for u in used):
            continue                    # read directly, or part of a submodule the graph reads (cond branches)
        owner = fetch_attr(gm, owner_path) if owner_path else gm
        if leaf in owner._parameters:
            del owner._parameters[leaf]
            removed += 1
        elif leaf in owner._buffers:
            del owner._buffers[leaf]
            removed += 1
    return removed


def module_path(node: fx.Node) -> str:
    """The dotted path of the innermost module the node came from ('' if unknown)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return path.removeprefix("model.") if path.startswith("model.") else path


_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)\n\s*(.*)')


def source_line(node: fx.Node) -> str:
    """'file.py:123 (code)' of the innermost frame outside torch itself, or ''."""
    return format_source(node.meta.get("stack_trace") or "")


def format_source(stack_trace: str) -> str:
    """'file.py:123 (code)' of a stack trace's innermost frame outside torch itself, or ''."""
    frames = _FRAME.findall(stack_trace)
    torch_dir = os.path.dirname(torch.__file__)
    user = [f for f in frames if not f[0].startswith(torch_dir)] or frames
    if not user:
        return ""
    path, line, _, code = user[-1]
    return f"{os.path.basename(path)}:{line} ({code.strip()})"


def describe(node: fx.Node) -> str:
    """One-line identification of a node for error messages and logs."""
    parts = [f"node '{node.name}' ({op_name(node)})"]
    if module_path(node):
        parts.append(f"in {module_path(node)}")
    if source_line(node):
        parts.append(f"at {source_line(node)}")
    return " ".join(parts)


def op_name(node: fx.Node) -> str:
    if node.op == "call_function":
        return str(getattr(node.target, "__name__", node.target)) if not hasattr(node.target, "_schema") \
            else str(node.target)
    return f"{node.op}:{node.target}"


def infer_meta(gm: fx.GraphModule, node: fx.Node) -> None:
    """Set node.meta['val'] for a node a pass created, by running its op on fake tensors."""
    fake_mode = detect_fake_mode([n.meta.get("val") for n in gm.graph.nodes if "val" in n.meta])

    def fake(arg):
        if isinstance(arg, fx.Node):
            if arg.op == "get_attr":
                value = fetch_attr(gm, arg.target)
                if value.is_meta and fake_mode is not None:    # a streamed weight (graphopt.ir.lazy): on the CPU
                    with fake_mode:
                        return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device="cpu")
                return fake_mode.from_tensor(value, static_shapes=True) if fake_mode else value.to("meta")
            return arg.meta["val"]
        return arg

    args = fx.node.map_aggregate(node.args, fake)
    kwargs = fx.node.map_aggregate(node.kwargs, fake)
    if fake_mode is None:
        node.meta["val"] = node.target(*args, **kwargs)
        return
    with fake_mode:
        node.meta["val"] = node.target(*args, **kwargs)


def fingerprint(gm: fx.GraphModule) -> str:
    """Changes whenever the graph or any of its constant tensors (identity or shape) changes."""
    h = hashlib.sha256(gm.graph.python_code("self").src.encode())
    for name, t in sorted(list(gm.named_parameters()) + list(gm.named_buffers()), key=lambda kv: kv[0]):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}:{storage_identity(t)}:{t._version}".encode())
    return h.hexdigest()


def op_histogram(gm: fx.GraphModule) -> dict[str, int]:
    counts: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_function":
            key = op_name(n)
            counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def parameter_bytes(gm: fx.GraphModule) -> int:
    seen, total = set(), 0
    for t in list(gm.parameters()) + list(gm.buffers()):
        if storage_identity(t) not in seen:
            seen.add(storage_identity(t))
            total += t.numel() * t.element_size()
    return total


def _is_impure(node: fx.Node) -> bool:
    # scaled_dot_product_attention carries the nondeterministic_seeded tag for its dropout;
    # with dropout_p == 0 (every exported inference graph) it is a pure function.
    if node.op == "call_function" and node.target is torch.ops.aten.scaled_dot_product_attention.default:
        dropout = node.kwargs.get("dropout_p", node.args[4] if len(node.args) > 4 else 0.0)
        return dropout != 0.0
    return node.is_impure()


def eliminate_dead_code(gm: fx.GraphModule) -> bool:
    """Remove nodes nobody reads that have no side effect; True if any went."""
    return gm.graph.eliminate_dead_code(is_impure_node=_is_impure)


_LAYOUT_OPS = ((ops.VIEWS - {torch.ops.aten.reshape.default}) | ops.TRANSPOSES | ops.MATRIX_TRANSPOSES | ops.UNSQUEEZES
               | ops.SQUEEZES | {torch.ops.aten.alias.default})


def views_reading(source: fx.Node) -> list[fx.Node]:
    """The aten.view nodes that read `source` through layout-only ops (transposes, views, ...)."""
    views, frontier = [], list(source.users)
    while frontier:
        node = frontier.pop()
        if node.op == "call_function" and node.target in _LAYOUT_OPS:
            if node.target is torch.ops.aten.view.default:
                views.append(node)
            frontier.extend(node.users)
    return views


def reshape_views_of_attention(gm: fx.GraphModule) -> bool:
    """The CPU attention kernel that ran at capture returns a (batch, seq, heads, dim) memory
    layout, so `attn.transpose(1, 2).reshape(...)` (Swin) was captured as a view. Re-exporting
    the IR (both backends do) traces attention with fake tensors, and torch.onnx then
    decomposes it into math: each gives its own strides, and the view fails in one of them
    ("Cannot view a tensor ..."). Such attention outputs are made contiguous (an Identity
    once lowered) and the views that read them through layout-only ops become reshapes, so
    every trace sees the same strides. In place; True if anything changed."""
    aten = torch.ops.aten
    changed = False
    for attention in list(gm.graph.find_nodes(op="call_function", target=aten.scaled_dot_product_attention.default)):
        views = views_reading(attention)
        if not views:
            continue
        with gm.graph.inserting_after(attention):
            contiguous = gm.graph.call_function(aten.clone.default, (attention,),
                                                {"memory_format": torch.contiguous_format})
        contiguous.meta = dict(attention.meta)
        contiguous.meta["val"] = attention.meta["val"].contiguous()
        attention.replace_all_uses_with(contiguous, delete_user_cb=lambda user: user is not contiguous)
        for view in views:
            view.target = aten.reshape.default
        changed = True
    return changed


def export_retrying_with_reshapes(gm: fx.GraphModule, export: Callable[[], T]) -> T:
    """`export()` (a re-export of `gm`); if it fails because of a view of an attention output,
    rewrite those views (`reshape_views_of_attention`) and export once more. Graphs that
    export as they are stay untouched."""
    try:
        return export()
    except Exception as error:  # noqa: BLE001 - retried once if the cause is known
        chain, seen, cause = [], set(), error
        while cause is not None and id(cause) not in seen:
            seen.add(id(cause))
            chain.append(str(cause))
            cause = cause.__cause__ or cause.__context__
        if not any("Cannot view a tensor" in text for text in chain) or not reshape_views_of_attention(gm):
            raise
    gm.recompile()
    return export()
