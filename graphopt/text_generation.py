"""compile(..., task="text-generation"): a Hugging Face causal LM -> a generation artifact.

The artifact holds one ONNX graph (graphopt.frontend.generation.GenerationGraph: prompt and decode
step are the same graph with a dynamic token count, so there is one copy of the weights on
disk and in memory), the tokenizer's tokenizer.json (gzipped), and a manifest "task" section with what
the torch-free runtime (graphopt.generation) needs: layers, cache shape, positions, special
tokens and the chat template. Every pass and preset applies as for any graph; calibration
windows of token ids become prompt calls that score every position.
"""
from __future__ import annotations

import gzip
from typing import Any, Sequence

import torch

from .errors import GraphoptError
from .frontend.generation import GenerationGraph, cache_shape, dynamic_dims, example_inputs, prompt_inputs
from .generation import TASK
from .ir.kv_attention import CACHE_DTYPES

TASKS = (TASK,)
GENERATION_BACKENDS = ("onnxruntime", "tvm")
TOKENIZER_FILE = "tokenizer.json.gz"


def _token_ids(value, name: str) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]


def task_section(model: torch.nn.Module, tokenizer: Any | None,
                 cache_dtype: str = "float32") -> tuple[dict, dict[str, bytes]]:
    """The manifest's task section and the extra files (the gzipped tokenizer.json) of a generation artifact."""
    config = model.config
    _, kv_heads, _, head_dim = cache_shape(config, 1, 1)
    generation_config = getattr(model, "generation_config", None)
    eos = _token_ids(getattr(generation_config, "eos_token_id", None), "eos") or \
        _token_ids(getattr(config, "eos_token_id", None), "eos")
    section = {"name": TASK, "layers": int(config.num_hidden_layers), "kv_heads": kv_heads, "head_dim": head_dim,
               "max_positions": int(config.max_position_embeddings), "vocab_size": int(config.vocab_size),
               "cache_dtype": cache_dtype, "eos_token_ids": eos,
               "pad_token_id": getattr(config, "pad_token_id", None), "tokenizer": None}
    files: dict[str, bytes] = {}
    if tokenizer is not None:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise GraphoptError(f"{type(tokenizer).__name__} is not a fast (tokenizers) tokenizer; "
                                "load it with AutoTokenizer.from_pretrained(..., use_fast=True)")
        files[TOKENIZER_FILE] = gzip.compress(backend.to_str().encode("utf-8"), compresslevel=9, mtime=0)
        section["tokenizer"] = TOKENIZER_FILE
        if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
            eos.append(int(tokenizer.eos_token_id))
        section.update(chat_template=getattr(tokenizer, "chat_template", None) or None,
                       bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token)
        if section["pad_token_id"] is None and tokenizer.pad_token_id is not None:
            section["pad_token_id"] = int(tokenizer.pad_token_id)
    return section, files


def compile_text_generation(model: torch.nn.Module, tokenizer: Any | None, passes, backend: str,
                            calibration: Sequence[Any] | None, cache_dtype: str | None = None, **options):
    """See graphopt.compile(task="text-generation")."""
    from .api import compile as compile_graph
    cache_dtype = cache_dtype or "float32"
    if cache_dtype not in CACHE_DTYPES:
        raise GraphoptError(f"cache_dtype must be one of {', '.join(CACHE_DTYPES)}, got {cache_dtype!r}")
    dtype = CACHE_DTYPES[cache_dtype]
    if backend not in GENERATION_BACKENDS:
        raise GraphoptError(f"task '{TASK}' lowers to {' and '.join(GENERATION_BACKENDS)} (backends with an "
                            f"in-place KV cache); got backend '{backend}'")
    if backend == "tvm" and cache_dtype != "float32":
        raise GraphoptError(f"task '{TASK}' on tvm keeps a float32 cache; got cache_dtype={cache_dtype!r}")
    graph = GenerationGraph(model)
    config = model.config
    batches = None
    if calibration:
        batches = []
        for item in calibration:
            ids = item[0] if isinstance(item, (tuple, list)) else item
            if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
                raise GraphoptError("text-generation calibration batches are token id tensors [batch, tokens]")
            batches.append(prompt_inputs(config, ids, dtype=dtype))
    compiled = compile_graph(graph, example_inputs(config, dtype), passes, backend,
                             dynamic_dims=dynamic_dims(graph.layers), calibration=batches, **options)
    compiled.task, compiled.extra_files = task_section(model, tokenizer, cache_dtype)
    if backend == "tvm" and graph.rotary_inside:     # ONNX Runtime folds the tables at load; TVM would store them
        compiled.executable.store_rotary_tables_as_recipes(graph.inv_freq, graph.max_positions, graph.rotary_scaling)
    return compiled
