"""Random-weight Hugging Face checkpoints of any size, written one layer at a time.

    write_random_checkpoint("dist/llama-2b", transformers.LlamaConfig(...))

makes a folder (config.json, safetensors shards, model.safetensors.index.json) that
`graphopt.compile(folder, ...)` and `transformers.AutoModelForCausalLM.from_pretrained` read,
without ever holding more than one layer in memory: what tests and benchmarks of the
layer-streaming compile need for models larger than this machine's memory. Weights are
normal(0, 0.02) like the models' own initialisation (biases too), norms ones; seeded, so reproducible.
"""
from __future__ import annotations

import json
import os
import re

import torch

from ..frontend.checkpoint import INDEX, empty_model


def write_random_checkpoint(folder: str, config, seed: int = 0) -> int:
    """Write `config`'s model with random weights to `folder`; returns the weights' bytes."""
    from safetensors.torch import save_file
    os.makedirs(folder, exist_ok=True)
    config.save_pretrained(folder)
    model = empty_model(folder)
    shards: dict[str, dict[str, torch.Tensor]] = {}
    seen = set()
    for name, param in model.named_parameters():          # tied weights once
        if id(param) in seen:
            continue
        seen.add(id(param))
        layer = re.search(r"\.layers\.(\d+)\.", name)
        shards.setdefault(f"layer-{int(layer.group(1)):05d}" if layer else "other", {})[name] = param
    generator = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    for shard, params in shards.items():
        tensors = {}
        for name, param in params.items():
            if "norm" in name:
                tensors[name] = torch.ones(param.shape, dtype=param.dtype)
            else:
                tensors[name] = torch.empty(param.shape, dtype=param.dtype).normal_(0.0, 0.02, generator=generator)
            total += tensors[name].numel() * tensors[name].element_size()
        filename = f"model-{shard}.safetensors"
        save_file(tensors, os.path.join(folder, filename), metadata={"format": "pt"})
        weight_map.update({name: filename for name in tensors})
        del tensors
    with open(os.path.join(folder, INDEX), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    return total
