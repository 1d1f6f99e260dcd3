"""Move an IR graph to another process: `pack_graph(gm)` is plain picklable data (node list,
targets by name, the tensors its get_attr nodes read, the metadata passes use),
`unpack_graph(packed, inputs)` rebuilds the GraphModule and recomputes each node's "val"
(shapes and dtypes) by fake-tensor propagation on `inputs`.

torch.fx's own pickling regenerates the graph from its Python code and loses node metadata
(module names, source lines, shapes), and graphs from torch.export do not pickle at all. This
format is for the processes of one installation (Ray workers), never for artifacts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from ..errors import GraphoptError

_KEPT_META = ("nn_module_stack", "stack_trace", "graphopt_source")


@dataclass(frozen=True)
class _NodeRef:
    name: str


@dataclass(frozen=True)
class _OpRef:
    qualified: str           # "aten.add.Tensor", "graphopt.matmul_nbits.default"


def _encode(value: Any) -> Any:
    if isinstance(value, fx.Node):
        return _NodeRef(value.name)
    if isinstance(value, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return _OpRef(str(value))
    if isinstance(value, (list, tuple)):
        items = [_encode(v) for v in value]
        return items if isinstance(value, list) else tuple(items)
    if isinstance(value, dict):
        return {k: _encode(v) for k, v in value.items()}
    if isinstance(value, slice):
        return slice(_encode(value.start), _encode(value.stop), _encode(value.step))
    return value


def _decode(value: Any, nodes: dict[str, fx.Node]) -> Any:
    if isinstance(value, _NodeRef):
        return nodes[value.name]
    if isinstance(value, _OpRef):
        return resolve_op(value.qualified)
    if isinstance(value, (list, tuple)):
        items = [_decode(v, nodes) for v in value]
        return items if isinstance(value, list) else tuple(items)
    if isinstance(value, dict):
        return {k: _decode(v, nodes) for k, v in value.items()}
    if isinstance(value, slice):
        return slice(_decode(value.start, nodes), _decode(value.stop, nodes), _decode(value.step, nodes))
    return value


def resolve_op(qualified: str):
    """torch.ops.<namespace>.<name>[.<overload>] from its string form."""
    import graphopt.ir.quantized  # noqa: F401 - registers graphopt's own ops
    target: Any = torch.ops
    for part in qualified.split("."):
        target = getattr(target, part)
    return target


def _attribute(gm: fx.GraphModule, target: str):
    owner_path, _, attr = target.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    value = getattr(owner, attr)
    kind = "parameter" if attr in owner._parameters else "buffer" if attr in owner._buffers else "attribute"
    return value, kind


def pack_graph(gm: fx.GraphModule) -> dict:
    """`gm` as picklable data: nodes in order, the tensors its get_attr nodes read."""
    nodes, tensors = [], {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target == "_guards_fn" and not node.users:
            continue                      # torch.export's check of the input shapes: nothing reads it
        if node.op == "call_module":
            raise GraphoptError(f"node '{node.name}' calls submodule '{node.target}': graphs moved between "
                                "processes must be flat (torch.export graphs are)")
        if node.op == "get_attr" and node.target not in tensors:
            value, kind = _attribute(gm, node.target)
            if not isinstance(value, torch.Tensor):
                raise GraphoptError(f"node '{node.name}' reads '{node.target}', a {type(value).__name__}, "
                                    "not a tensor: the graph cannot move to another process")
            tensors[node.target] = (value.detach(), kind)
        target = _encode(node.target) if node.op == "call_function" else node.target
        meta = {k: node.meta[k] for k in _KEPT_META if k in node.meta}
        nodes.append((node.op, node.name, target, _encode(node.args), _encode(node.kwargs), meta))
    return {"nodes": nodes, "tensors": tensors}


def unpack_graph(packed: dict, inputs: tuple | None = None) -> fx.GraphModule:
    """The GraphModule `pack_graph` described; with `inputs`, each node's "val" is recomputed."""
    root = torch.nn.Module()
    for target, (value, kind) in packed["tensors"].items():
        owner = root
        *path, attr = target.split(".")
        for part in path:
            if not hasattr(owner, part):
                owner.add_module(part, torch.nn.Module())
            owner = getattr(owner, part)
        if kind == "parameter":
            owner.register_parameter(attr, torch.nn.Parameter(value, requires_grad=False))
        elif kind == "buffer":
            owner.register_buffer(attr, value)
        else:
            setattr(owner, attr, value)
    graph = fx.Graph()
    by_name: dict[str, fx.Node] = {}
    for op, name, target, args, kwargs, meta in packed["nodes"]:
        if op == "call_function":
            target = _decode(target, by_name)
        node = graph.create_node(op, target, _decode(args, by_name), _decode(kwargs, by_name), name=name)
        if node.name != name:
            raise GraphoptError(f"node '{name}' came back as '{node.name}'")
        node.meta.update(meta)
        by_name[name] = node
    gm = fx.GraphModule(root, graph)
    if inputs is not None:
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.fx.passes.fake_tensor_prop import FakeTensorProp
        FakeTensorProp(gm, FakeTensorMode(allow_non_fake_inputs=True)).propagate(*inputs)
    return gm
