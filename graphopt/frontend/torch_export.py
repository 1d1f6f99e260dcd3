"""Capture: nn.Module (or an .onnx file) + example inputs -> a CapturedModel.

The IR is the unlifted ATen-level torch.fx GraphModule of a torch.export ExportedProgram
(after `run_decompositions({})`, so no training-only ops remain). Nodes keep
`meta["val"]` (shapes), `meta["nn_module_stack"]` (the module they came from) and
`meta["stack_trace"]` (source lines). Inputs are positional tensors and outputs a flat
tuple of tensors; their names, shapes and dtypes are kept as TensorSpecs.
"""
from __future__ import annotations

import contextlib
import inspect
import os
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from ..errors import CaptureError, GraphoptError
from ..specs import TensorSpec, dtype_name
from .moe import experts_as_one_op


@dataclass
class CapturedModel:
    """The IR of a model plus its I/O specification."""

    graph_module: fx.GraphModule
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    example_inputs: tuple[torch.Tensor, ...] = ()
    source: str = ""
    dynamic_dims: dict[int, dict[int, str]] = field(default_factory=dict)
    # True when torch.export could not prove its guards for named Dims (e.g. a KV cache's
    # past length) and the dims were re-declared Dim.DYNAMIC, letting torch.export infer them
    infer_dynamic: bool = False

    def dynamic_shapes(self, varargs: bool = False):
        """torch.export dynamic_shapes for re-exporting this model's graph."""
        return dynamic_shapes(self.example_inputs, self.dynamic_dims, varargs, self.infer_dynamic)

    def __call__(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        with torch.no_grad():
            return tuple(self.graph_module(*args))


def flat_tensors(out: Any) -> list[torch.Tensor]:
    """The tensor leaves of a model's output (tuple, dict, ModelOutput, ...), in capture order."""
    return [leaf for leaf in pytree.tree_leaves(out) if isinstance(leaf, torch.Tensor)]


class _FlatIO(torch.nn.Module):
    """Calls the user's model with positional or keyword inputs and flattens its outputs."""

    def __init__(self, model: torch.nn.Module, keyword_names: Sequence[str] | None):
        super().__init__()
        self.model = model
        self.keyword_names = list(keyword_names) if keyword_names else None

    def forward(self, *args: torch.Tensor):
        if self.keyword_names:
            out = self.model(**dict(zip(self.keyword_names, args)))
        else:
            out = self.model(*args)
        self.output_names = _output_names(out)
        return tuple(flat_tensors(out))


def _output_names(out: Any) -> list[str]:
    names = []
    for path, leaf in pytree.tree_flatten_with_path(out)[0]:
        if isinstance(leaf, torch.Tensor):
            name = re.sub(r"[^0-9A-Za-z_]+", ".", pytree.keystr(path)).strip(".")
            names.append(name or f"output{len(names)}")
    if len(set(names)) != len(names):
        names = [f"output{i}" for i in range(len(names))]
    return names


def _input_names(model: torch.nn.Module, count: int) -> list[str]:
    if isinstance(getattr(model, "input_names", None), list):      # an imported ONNX graph's own names
        names = list(model.input_names)[:count]
        return names + [f"input{i}" for i in range(len(names), count)]
    try:
        params = [p for p in inspect.signature(model.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        names = [p.name for p in params][:count]
    except (TypeError, ValueError):
        names = []
    return names + [f"input{i}" for i in range(len(names), count)]


@contextlib.contextmanager
def _no_kv_cache(model: torch.nn.Module):
    """Hugging Face models return a KV cache by default; the IR is a stateless function."""
    config = getattr(model, "config", None)
    old = getattr(config, "use_cache", None)
    if old:
        config.use_cache = False
    try:
        yield
    finally:
        if old:
            config.use_cache = old


def _normalise_inputs(model, example_inputs):
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if isinstance(example_inputs, Mapping):
        names = list(example_inputs)
        return names, tuple(example_inputs.values()), names
    example_inputs = tuple(example_inputs)
    return _input_names(model, len(example_inputs)), example_inputs, None


def dynamic_shapes(args, dynamic_dims: Mapping[int, Mapping[int, str]], varargs: bool = False,
                   infer: bool = False):
    """torch.export dynamic_shapes for positional `args` (`varargs`: for a forward(*args)).
    `infer`: declare every dim Dim.DYNAMIC instead of named Dims (torch.export infers ranges
    and equalities itself)."""
    if not dynamic_dims:
        return None
    made: dict[str, Any] = {}
    shapes = []
    for index, arg in enumerate(args):
        dims = dynamic_dims.get(index, {})
        spec = {}
        for dim, name in dims.items():
            if infer:
                spec[dim] = torch.export.Dim.DYNAMIC
            elif name not in made:
                made[name] = torch.export.Dim(name, min=2, max=max(4096, int(arg.shape[dim]) * 8))
            if not infer:
                spec[dim] = made[name]
        shapes.append(spec or None)
    return (tuple(shapes),) if varargs else tuple(shapes)


def sequence_dims(args: Sequence[torch.Tensor], dim: int = 1, name: str = "seq") -> dict[int, dict[int, str]]:
    """Dynamic-dims mapping that makes dim `dim` of every input with that many dims dynamic."""
    return {i: {dim: name} for i, a in enumerate(args) if a.dim() > dim}


_INDEX_CARRIERS = {"view", "reshape", "unsqueeze", "squeeze", "_to_copy", "to", "clone", "contiguous",
                   "expand", "flatten", "_unsafe_view", "alias"}


def index_ranges(gm: torch.fx.GraphModule) -> dict[int, tuple[int, int]]:
    """Input position -> (0, rows) for each graph input that indexes an embedding table,
    directly or through reshapes and casts (intersected over all the tables it indexes)."""
    positions = {node: i for i, node in enumerate(gm.graph.find_nodes(op="placeholder"))}
    ranges: dict[int, tuple[int, int]] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or getattr(node.target, "_opname", None) != "embedding":
            continue
        weight, index = node.args[0], node.args[1]
        rows = getattr(weight.meta.get("val"), "shape", [None])[0] if isinstance(weight, torch.fx.Node) else None
        while isinstance(index, torch.fx.Node) and index.op == "call_function" and \
                getattr(index.target, "_opname", None) in _INDEX_CARRIERS:
            index = index.args[0]
        if isinstance(rows, int) and index in positions:
            low, high = ranges.get(positions[index], (0, rows))
            ranges[positions[index]] = (low, min(high, rows))
    return ranges


def _check_positions(model, example_inputs) -> None:
    """A Hugging Face model given more tokens than it has positions fails here, at once,
    instead of deep in capture (or out of memory)."""
    config = getattr(model, "config", None)
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    first = example_inputs if isinstance(example_inputs, torch.Tensor) else (
        next(iter(example_inputs.values()), None) if isinstance(example_inputs, Mapping) else
        (example_inputs[0] if isinstance(example_inputs, (tuple, list)) and example_inputs else None))
    if isinstance(limit, int) and isinstance(first, torch.Tensor) and first.dim() == 2 and \
            not first.is_floating_point() and first.shape[1] > limit:
        raise CaptureError(f"{type(model).__name__}: example input has {first.shape[1]} tokens, more than the "
                           f"model's {limit} positions (config.max_position_embeddings)")


def capture(model: torch.nn.Module | str | os.PathLike, example_inputs: Any,
            dynamic_dims: Mapping[int, Mapping[int, str]] | None = None) -> CapturedModel:
    """Capture `model` into the IR.

    `example_inputs` is a tensor, a tuple of tensors (positional), or a dict of tensors
    (keyword; the dict order becomes the positional order of the compiled model).
    `dynamic_dims` maps input index -> {dim index: dim name}; see `sequence_dims`.
    An .onnx path is imported first (see graphopt.frontend.onnx).
    """
    _check_positions(model, example_inputs)
    if isinstance(model, (str, os.PathLike)):
        from .onnx import import_onnx
        if dynamic_dims:
            raise CaptureError(f"{os.fspath(model)}: ONNX files import with static shapes (the example inputs fix "
                               "every dim), so dynamic_dims cannot be honoured; compile the PyTorch model for "
                               "dynamic dims, or compile the file once per input shape")
        model, example_inputs = import_onnx(model, example_inputs)
    if not isinstance(model, torch.nn.Module):
        raise CaptureError(f"expected a torch.nn.Module or an .onnx path, got {type(model).__name__}")
    names, args, keyword_names = _normalise_inputs(model, example_inputs)
    for name, arg in zip(names, args):
        if not isinstance(arg, torch.Tensor):
            raise CaptureError(f"example input '{name}' is {type(arg).__name__}; only tensors are supported")
    source = type(model).__name__
    was_training = model.training
    model.eval()
    wrapper = _FlatIO(model, keyword_names)
    dynamic_dims = {int(k): {int(d): str(n) for d, n in v.items()} for k, v in (dynamic_dims or {}).items()}
    infer = False
    try:
        # weights on the meta device (a streamed checkpoint) cannot run eagerly: names come from the trace
        empty = any(p.is_meta for p in model.parameters())
        with _no_kv_cache(model), experts_as_one_op(model), torch.no_grad():
            if not empty:
                raw = model(**dict(zip(keyword_names, args))) if keyword_names else model(*args)
                flat = flat_tensors(raw)
            try:
                program = torch.export.export(wrapper, args,
                                              dynamic_shapes=dynamic_shapes(args, dynamic_dims, varargs=True))
            except Exception as exc:  # noqa: BLE001 - retried below, re-raised if it fails again
                if not dynamic_dims or "Constraints violated" not in str(exc):
                    raise
                infer = True
                program = torch.export.export(wrapper, args,
                                              dynamic_shapes=dynamic_shapes(args, dynamic_dims, True, infer=True))
            program = program.run_decompositions({})
            out_names = wrapper.output_names
    except GraphoptError:
        raise
    except Exception as exc:  # torch.export raises many types; keep one line plus the cause
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CaptureError(f"torch.export could not capture {source}: {first}") from exc
    finally:
        model.train(was_training)
    gm = program.module()
    gm.meta["graphopt_source"] = source
    own = getattr(model, "output_names", None)                          # an imported ONNX graph's own names
    taken = {n.name for n in gm.graph.nodes if n.op != "placeholder"}   # a re-export names values after nodes
    if isinstance(own, list) and len(own) == len(flat) and len(set(own)) == len(own) and not taken & set(own):
        out_names = list(own)
    ranges = index_ranges(gm)
    inputs = [TensorSpec(n, tuple(dynamic_dims.get(i, {}).get(d, int(s)) for d, s in enumerate(a.shape)), dtype_name(a),
                         ranges.get(i))
              for i, (n, a) in enumerate(zip(names, args))]
    out_vals = [n.meta.get("val") for n in gm.graph.find_nodes(op="output")[0].args[0]]
    if empty:
        flat = out_vals
    outputs = []
    for name, eager, val in zip(out_names, flat, out_vals):
        shape = tuple(int(s) if isinstance(s, int) or (hasattr(s, "node") and s.node.is_constant()) else str(s)
                      for s in (val.shape if val is not None else eager.shape))
        outputs.append(TensorSpec(name, shape, dtype_name(eager)))
    return CapturedModel(gm, inputs, outputs, tuple(args), source, dynamic_dims, infer)
