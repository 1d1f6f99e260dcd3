"""Weights that stay on disk until something reads their values (the layer-streaming compile).

A graph captured from a checkpoint folder (graphopt.frontend.checkpoint) holds its weights as
meta tensors: shapes and dtypes, no data. `LazyWeights`, kept in gm.meta, says how to load each
such attribute: a tensor of a safetensors file, or the concatenation of other lazy attributes
(what horizontal fusion makes). Analyses that look at shapes see the meta tensors; code that
needs values asks for them here and gets a fresh tensor it may drop once used, so memory holds
one layer's weights at a time:

    value(gm, target)        the real tensor of a lazy attribute
    resolve(gm, tensor)      the real tensor of a meta tensor read from the graph (or its .t())
    interpreter(gm)          an fx.Interpreter that loads lazy attributes as the run reaches them
                             and frees every value after its last use
    materialize(gm)          loads what is still lazy (norms, the weights no pass replaced) before
                             lowering; a meta attribute without a recipe (a pass computed it from
                             unloaded weights) is an error naming it, never a silent zero
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx

from ..errors import GraphoptError
from .graph import fetch_attr

META_KEY = "graphopt_lazy_weights"


@dataclass
class LazyWeights:
    loader: Callable[[str], torch.Tensor]                      # checkpoint key -> tensor
    files: dict[str, str] = field(default_factory=dict)        # attribute -> checkpoint key
    concatenations: dict[str, tuple[tuple[str, ...], int]] = field(default_factory=dict)
    loaded_bytes: int = 0                                      # read from disk so far (for the log)

    def __contains__(self, target: str) -> bool:
        return target in self.files or target in self.concatenations

    def load(self, target: str) -> torch.Tensor:
        if target in self.files:
            tensor = self.loader(self.files[target])
            self.loaded_bytes += tensor.numel() * tensor.element_size()
            return tensor
        parts, dim = self.concatenations[target]
        return torch.cat([self.load(part) for part in parts], dim)


def lazy_weights(gm: fx.GraphModule) -> LazyWeights | None:
    return gm.meta.get(META_KEY)


def value(gm: fx.GraphModule, target: str) -> torch.Tensor:
    """The real tensor of attribute `target` (itself, if it is not lazy)."""
    tensor = fetch_attr(gm, target)
    if not (isinstance(tensor, torch.Tensor) and tensor.is_meta):
        return tensor
    lazy = lazy_weights(gm)
    if lazy is None or target not in lazy:
        raise GraphoptError(f"attribute '{target}' has no data (a meta tensor) and no checkpoint tensor to load it "
                            "from: a pass computed it from weights that were not loaded")
    loaded = lazy.load(target)
    if loaded.shape != tensor.shape or loaded.dtype != tensor.dtype:
        raise GraphoptError(f"attribute '{target}': the checkpoint holds {loaded.dtype} {tuple(loaded.shape)}, "
                            f"the model expects {tensor.dtype} {tuple(tensor.shape)}")
    return loaded


def _targets_by_tensor(gm: fx.GraphModule) -> dict[int, str]:
    lazy = lazy_weights(gm)
    found = {}
    for node in gm.graph.find_nodes(op="get_attr"):
        tensor = fetch_attr(gm, node.target)
        if isinstance(tensor, torch.Tensor) and tensor.is_meta and lazy is not None and node.target in lazy:
            found[id(tensor)] = node.target
    return found


def resolve(gm: fx.GraphModule, tensor: torch.Tensor) -> torch.Tensor:
    """The real values of `tensor`, a lazy attribute of `gm` or its transpose (what
    graphopt.ir.linear.linear_weight returns); a real tensor comes back as is."""
    if not tensor.is_meta:
        return tensor
    targets = _targets_by_tensor(gm)
    if id(tensor) in targets:
        return value(gm, targets[id(tensor)])
    base = tensor._base
    if base is not None and id(base) in targets and base.dim() == 2 and tensor.shape == base.t().shape \
            and tensor.stride() == base.t().stride():
        return value(gm, targets[id(base)]).t()
    raise GraphoptError(f"a {tuple(tensor.shape)} weight has no data and is not a checkpoint tensor of the graph")


def is_lazy(gm: fx.GraphModule, tensor: Any) -> bool:
    return isinstance(tensor, torch.Tensor) and tensor.is_meta and lazy_weights(gm) is not None


def add_concatenation(gm: fx.GraphModule, name: str, parts: list[torch.Tensor], dim: int) -> None:
    """Record lazy attribute `name` (already registered as a meta tensor) = cat(parts, dim)."""
    targets = _targets_by_tensor(gm)
    missing = [tuple(p.shape) for p in parts if id(p) not in targets]
    if missing:
        raise GraphoptError(f"'{name}' concatenates weights without data that are not checkpoint tensors {missing}")
    lazy_weights(gm).concatenations[name] = (tuple(targets[id(p)] for p in parts), dim)


@dataclass(frozen=True)
class _Deferred:
    target: str


class LazyInterpreter(fx.Interpreter):
    """Runs a graph whose weights may be lazy: each is loaded for the node that reads it and
    dropped after (torch.export puts every get_attr at the top of the graph: loading there
    would hold the whole model)."""

    def fetch_attr(self, target: str):
        tensor = super().fetch_attr(target)
        if isinstance(tensor, torch.Tensor) and tensor.is_meta and lazy_weights(self.module) is not None:
            return _Deferred(target)
        return tensor

    def fetch_args_kwargs_from_env(self, n: fx.Node):
        args, kwargs = super().fetch_args_kwargs_from_env(n)
        load = lambda v: value(self.module, v.target) if isinstance(v, _Deferred) else v
        return fx.node.map_aggregate(args, load), fx.node.map_aggregate(kwargs, load)


def run(gm: fx.GraphModule, inputs: tuple) -> Any:
    """gm(*inputs), loading lazy weights as needed."""
    if lazy_weights(gm) is None:
        return gm(*inputs)
    return LazyInterpreter(gm).run(*inputs)


def materialize(gm: fx.GraphModule) -> int:
    """Load every lazy attribute the graph still reads into the module; returns the bytes loaded."""
    lazy = lazy_weights(gm)
    if lazy is None:
        return 0
    total = 0
    for target in sorted({n.target for n in gm.graph.find_nodes(op="get_attr")}):
        tensor = fetch_attr(gm, target)
        if not (isinstance(tensor, torch.Tensor) and tensor.is_meta):
            continue
        loaded = value(gm, target)
        owner_path, _, leaf = target.rpartition(".")
        owner = gm.get_submodule(owner_path) if owner_path else gm
        if leaf in owner._parameters:
            owner._parameters[leaf] = torch.nn.Parameter(loaded, requires_grad=False)
        elif leaf in owner._buffers:
            owner._buffers[leaf] = loaded
        else:
            setattr(owner, leaf, loaded)
        total += loaded.numel() * loaded.element_size()
    del gm.meta[META_KEY]
    return total
