"""Capture a Hugging Face checkpoint folder without loading its weights (layer-streaming compile).

`graphopt.compile("path/to/folder", inputs, passes="int4")` on a folder with config.json and
safetensors files (one, or shards with model.safetensors.index.json): the model is built from
its config with empty (meta) weights, captured as usual, and its weights become lazy attributes
(graphopt.ir.lazy) that name their safetensors tensors. Passes read one weight at a time
(quantization replaces it with its 4- or 8-bit codes), graph runs (verification, calibration)
load each weight when they reach it and free it after its last use, and what is still lazy is
loaded just before lowering. Peak memory is then about the largest layer plus the output, not
the fp32 model.
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

import torch

from ..errors import CaptureError
from ..ir.graph import fetch_attr
from ..ir.lazy import META_KEY, LazyWeights
from .torch_export import CapturedModel, capture

INDEX = "model.safetensors.index.json"


def is_checkpoint(path: Any) -> bool:
    return isinstance(path, (str, os.PathLike)) and os.path.isdir(path) and \
        os.path.exists(os.path.join(path, "config.json"))


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def _header(path: str) -> dict:
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    for entry in header.values():
        entry["start"] = 8 + size + entry["data_offsets"][0]
    return header


class SafetensorsFiles:
    """Tensor name -> its place in a checkpoint folder's safetensors files. A tensor is read
    into memory of its own (safetensors' own loader maps the whole file, and the mapping
    outlives the tensor: a layer-streamed compile would map the whole model)."""

    def __init__(self, folder: str):
        self.folder = folder
        index = os.path.join(folder, INDEX)
        if os.path.exists(index):
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        else:
            files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
            if not files:
                raise CaptureError(f"{folder}: no .safetensors files (and no {INDEX})")
        self.where: dict[str, tuple[str, dict]] = {}
        for name in files:
            for key, entry in _header(os.path.join(folder, name)).items():
                self.where[key] = (name, entry)

    def __call__(self, key: str) -> torch.Tensor:
        name, entry = self.where[key]
        if entry["dtype"] not in _DTYPES:
            raise CaptureError(f"{name}: tensor '{key}' has dtype {entry['dtype']}, which graphopt does not read")
        tensor = torch.empty(entry["shape"], dtype=_DTYPES[entry["dtype"]])
        begin, end = entry["data_offsets"]
        if end - begin != tensor.numel() * tensor.element_size():
            raise CaptureError(f"{name}: tensor '{key}' holds {end - begin} bytes, its shape needs "
                               f"{tensor.numel() * tensor.element_size()}")
        if tensor.numel():
            with open(os.path.join(self.folder, name), "rb") as f:
                f.seek(entry["start"])
                f.readinto(memoryview(tensor.view(-1).view(torch.uint8).numpy()))
        return tensor


def empty_model(folder: str) -> torch.nn.Module:
    """The folder's model built from its config, parameters on the meta device (buffers real:
    rotary frequencies and other computed buffers are not in checkpoints)."""
    import accelerate
    import transformers
    config = transformers.AutoConfig.from_pretrained(folder)
    _map_large_allocations()
    with accelerate.init_empty_weights(include_buffers=False):
        model = transformers.AutoModelForCausalLM.from_config(config)
    model.tie_weights()              # from_config leaves empty tied weights as two tensors
    return model.eval()


def _map_large_allocations() -> None:
    """Each weight is allocated on the CPU (never touched) before it moves to the meta device.
    glibc serves allocations below a threshold it raises as big blocks are freed (up to 32 MB)
    from its heap and keeps the heap after they are freed: the fp32 model's size in address
    space, which a data-size limit (RLIMIT_DATA) counts as if the model were loaded. A fixed
    1 MiB threshold maps every weight on its own and unmaps it when freed (process-wide)."""
    import ctypes
    import ctypes.util
    mmap_threshold = -3                   # M_MMAP_THRESHOLD in malloc.h
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(mmap_threshold, 1 << 20)
    except (OSError, AttributeError):     # not glibc: its allocator is not this one
        pass


def _checkpoint_key(target: str, known: Mapping[str, str], tied: Mapping[str, str]) -> str | None:
    name = target[len("model."):] if target.startswith("model.") else target   # capture's wrapper
    if name in known:
        return name
    return tied.get(name) if tied.get(name) in known else None


def _device_to_cpu(gm) -> None:
    """HF code creates tensors on its inputs' device (the meta device here): put them on the
    CPU, where the graph will run once its weights are loaded; the recorded shapes say so too."""
    from torch._subclasses.fake_tensor import FakeTensor
    meta, cpu = torch.device("meta"), torch.device("cpu")
    for node in gm.graph.nodes:
        if node.kwargs.get("device") == meta:
            node.update_kwarg("device", cpu)
        for val in torch.utils._pytree.tree_leaves(node.meta.get("val")):
            if isinstance(val, FakeTensor) and val.fake_device == meta:
                val.fake_device = cpu
    gm.recompile()


def capture_checkpoint(folder: str, example_inputs: Any,
                       dynamic_dims: Mapping[int, Mapping[int, str]] | None = None) -> CapturedModel:
    files = SafetensorsFiles(folder)
    model = empty_model(folder)
    captured = capture(model, example_inputs, dynamic_dims)
    gm = captured.graph_module
    _device_to_cpu(gm)
    # a tied head has no tensor of its own in the checkpoint: its name maps to the embedding's
    tied = {}
    output, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if output is not None and embedding is not None and output.weight is embedding.weight:
        aliases = [n for n, p in model.named_parameters(remove_duplicate=False) if p is embedding.weight]
        stored = [n for n in aliases if n in files.where]
        if stored:
            tied = {alias: stored[0] for alias in aliases}
    lazy = LazyWeights(files)
    for node in gm.graph.find_nodes(op="get_attr"):
        tensor = fetch_attr(gm, node.target)
        if not (isinstance(tensor, torch.Tensor) and tensor.is_meta):
            continue
        key = _checkpoint_key(node.target, files.where, tied)
        if key is None:
            raise CaptureError(f"{folder}: the model's weight '{node.target}' is in none of the safetensors files")
        lazy.files[node.target] = key
    gm.meta[META_KEY] = lazy
    captured.source = f"{type(model).__name__} ({os.path.basename(os.path.normpath(folder))}, weights streamed)"
    return captured
