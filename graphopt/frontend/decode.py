"""KV-cache decode steps of Hugging Face causal LMs as stateless graphs.

    step = DecodeStep(model)                       # forward(input_ids, *past) -> (logits, *present)
    past = prefill_cache(model, prompt_ids)        # k0, v0, k1, v1, ... each [batch, kv_heads, P, head_dim]
    cm = graphopt.compile(step, (next_id, *past), dynamic_dims=past_dims(model))
    logits, *present = cm(next_id, *past)

The cache travels as plain tensors (two per layer), so the step is a pure function that
torch.export captures, the passes rewrite (sublayers are found in it as in a prefill graph)
and the backends lower with a dynamic past length. `generate_greedy` runs it token by token.
"""
from __future__ import annotations

import torch


def _layers(model: torch.nn.Module) -> int:
    return int(model.config.num_hidden_layers)


class DecodeStep(torch.nn.Module):
    """One decoding step of `model` with its KV cache as explicit inputs and outputs."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, *past: torch.Tensor):
        from transformers import DynamicCache
        layers = _layers(self.model)
        if len(past) != 2 * layers:
            raise ValueError(f"a decode step of this model takes {2 * layers} cache tensors "
                             f"(keys and values of {layers} layers), got {len(past)}")
        cache = DynamicCache(config=self.model.config)
        for layer in range(layers):
            cache.update(past[2 * layer], past[2 * layer + 1], layer)
        start = past[0].shape[2]
        positions = torch.arange(start, start + input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        out = self.model(input_ids=input_ids, past_key_values=cache, position_ids=positions, use_cache=True)
        present = []
        for layer in out.past_key_values.layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


def prefill_cache(model: torch.nn.Module, input_ids: torch.Tensor) -> list[torch.Tensor]:
    """The KV cache after running `input_ids` through the eager model: [k0, v0, k1, v1, ...]."""
    with torch.no_grad():
        out = model(input_ids=input_ids, use_cache=True)
    cache = []
    for layer in out.past_key_values.layers:
        cache += [layer.keys.contiguous(), layer.values.contiguous()]
    return cache


def past_dims(model: torch.nn.Module, name: str = "past") -> dict[int, dict[int, str]]:
    """dynamic_dims for a DecodeStep: the past length (dim 2) of every cache input."""
    return {1 + i: {2: name} for i in range(2 * _layers(model))}


def generate_greedy(step, prompt_ids: torch.Tensor, model: torch.nn.Module, new_tokens: int) -> torch.Tensor:
    """Greedy decoding with a compiled (or eager) DecodeStep `step`; the prompt's cache comes
    from the eager `model`. Returns the generated token ids [1, new_tokens]."""
    past = prefill_cache(model, prompt_ids[:, :-1])
    token = prompt_ids[:, -1:]
    generated = []
    for _ in range(new_tokens):
        logits, *past = step(token, *past)
        token = torch.as_tensor(logits)[:, -1:].argmax(-1)
        generated.append(token)
        past = [torch.as_tensor(t) for t in past]
    return torch.cat(generated, dim=1)
