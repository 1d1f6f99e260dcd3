"""Hugging Face causal LMs as one text-generation graph: prompt and decode steps alike.

    graph = GenerationGraph(model)
    logits, *present = graph(input_ids, position_ids, seqlens_k, total_length, logit_positions, *past)

input_ids / position_ids [B, S] are this call's tokens and their positions (S = the prompt's
length, or 1 per decode step); seqlens_k / total_length describe the cache after the call
(see graphopt.ir.kv_attention); logit_positions [B, K] picks the positions whose next-token
logits are computed (the last prompt token when generating, every position for perplexity),
so the LM head never runs on the whole prompt; past is k0, v0, k1, v1, ... each
[B, kv_heads, capacity, head_dim] and present the same buffers with this call's keys and
values written in. During capture each attention module runs graphopt.kv_attention on its
own q/k/v projections, which also applies the rotary embedding from a [max_positions, D/2]
table (ONNX Runtime's GroupQueryAttention does it inside; models with q/k norms, as Qwen3,
keep the model's rotary and swap only the attention function). Every other node is the
model's own, so every pass applies; the backends lower kv_attention to an in-place update.
"""
from __future__ import annotations

import contextlib

import torch

from ..errors import GraphoptError
from ..ir.kv_attention import KV_ATTENTION

ATTENTION = "graphopt_kv"
INPUT_NAMES = ("input_ids", "position_ids", "seqlens_k", "total_length", "logit_positions")
# Architectures whose forward is embed -> decoder layers -> norm -> LM head and whose attention
# goes through the attention interface with no window, sink or soft-cap (checked in _refuse).
SUPPORTED_TYPES = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen3_moe")
# Their attention is q/k/v projections -> rotary -> attention -> o_proj, nothing in between.
ROTARY_INSIDE = ("llama", "mistral", "qwen2", "mixtral")


class _CacheState:
    def __init__(self, past, seqlens_k, total_length):
        self.past, self.seqlens_k, self.total_length = past, seqlens_k, total_length
        self.present: list = [None] * len(past)


def _kv_attention_function(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                           sliding_window=None, softcap=None, graphopt_cache=None, **kwargs):
    if graphopt_cache is None:
        raise GraphoptError(f"attention '{ATTENTION}' runs only inside graphopt.frontend.generation.GenerationGraph")
    if sliding_window is not None or softcap is not None or dropout:
        raise GraphoptError(f"{type(module).__name__}: sliding-window, soft-capped or dropout attention has no "
                            "text-generation lowering yet")
    batch, heads, seq, head_dim = query.shape
    kv_heads = key.shape[1]
    layer = module.layer_idx
    state = graphopt_cache
    out, present_key, present_value = KV_ATTENTION(
        query.transpose(1, 2).reshape(batch, seq, heads * head_dim),
        key.transpose(1, 2).reshape(batch, seq, kv_heads * head_dim),
        value.transpose(1, 2).reshape(batch, seq, kv_heads * head_dim),
        state.past[2 * layer], state.past[2 * layer + 1], state.seqlens_k, state.total_length,
        heads, kv_heads, float(scaling if scaling is not None else head_dim ** -0.5))
    state.present[2 * layer], state.present[2 * layer + 1] = present_key, present_value
    return out.reshape(batch, seq, heads, head_dim), None


def _attention_with_rotary(module, state, cos_cache, sin_cache):
    """A replacement forward for a Llama-style attention module: projections, then
    kv_attention with the rotary table (positions come from the cache state)."""
    config = module.config
    heads, kv_heads = int(config.num_attention_heads), int(config.num_key_value_heads)

    def forward(hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
        layer = module.layer_idx
        out, present_key, present_value = KV_ATTENTION(
            module.q_proj(hidden_states), module.k_proj(hidden_states), module.v_proj(hidden_states),
            state.past[2 * layer], state.past[2 * layer + 1], state.seqlens_k, state.total_length,
            heads, kv_heads, float(module.scaling), cos_cache, sin_cache)
        state.present[2 * layer], state.present[2 * layer + 1] = present_key, present_value
        return module.o_proj(out), None
    return forward


@contextlib.contextmanager
def _attention_modules_replaced(decoder, state, cos_cache, sin_cache):
    modules = [layer.self_attn for layer in decoder.layers]
    for module in modules:
        module.forward = _attention_with_rotary(module, state, cos_cache, sin_cache)
    try:
        yield
    finally:
        for module in modules:
            del module.forward


def _register_attention() -> None:
    from transformers import AttentionInterface
    AttentionInterface.register(ATTENTION, _kv_attention_function)


@contextlib.contextmanager
def _attention_swapped(model: torch.nn.Module):
    _register_attention()
    config = model.config
    old = config._attn_implementation
    config._attn_implementation = ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = old


def _refuse(model: torch.nn.Module) -> None:
    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None)
    if kind not in SUPPORTED_TYPES:
        raise GraphoptError(f"text generation supports {', '.join(SUPPORTED_TYPES)} causal LMs; "
                            f"{type(model).__name__} is '{kind}'")
    for attr in ("sliding_window", "final_logit_softcapping", "attn_logit_softcapping"):
        value = getattr(config, attr, None)
        if value and (attr != "sliding_window" or getattr(config, "use_sliding_window", True)):
            raise GraphoptError(f"{type(model).__name__}: config.{attr}={value} has no text-generation lowering yet")
    if getattr(config, "rope_scaling", None) and (config.rope_scaling or {}).get("rope_type") not in (None, "default"):
        raise GraphoptError(f"{type(model).__name__}: rope scaling {config.rope_scaling} is untested for generation")


class GenerationGraph(torch.nn.Module):
    """A causal LM's prompt/decode step with its KV cache as explicit buffers (see module doc)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        _refuse(model)
        self.model = model
        self.decoder = model.get_decoder()
        self.lm_head = model.get_output_embeddings()
        self.layers = int(model.config.num_hidden_layers)
        self.rotary_inside = model.config.model_type in ROTARY_INSIDE
        if self.rotary_inside:
            self.max_positions = int(model.config.max_position_embeddings)
            self.register_buffer("inv_freq", self.decoder.rotary_emb.inv_freq.detach().float().clone())
            self.rotary_scaling = float(getattr(self.decoder.rotary_emb, "attention_scaling", 1.0))
            _check_rotary_tables(self.rotary_tables(), rotary_tables(self.decoder, self.max_positions))

    def rotary_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [max_positions, D/2], computed in the graph from the D/2 frequencies so
        the artifact stores 32 floats, not two tables (ONNX Runtime folds them at load)."""
        freqs = torch.arange(self.max_positions, dtype=torch.float32).unsqueeze(-1) * self.inv_freq.unsqueeze(0)
        cos, sin = freqs.cos(), freqs.sin()
        if self.rotary_scaling != 1.0:
            cos, sin = cos * self.rotary_scaling, sin * self.rotary_scaling
        return cos, sin

    @property
    def input_names(self) -> list[str]:
        names = list(INPUT_NAMES)
        for layer in range(self.layers):
            names += [f"past_key.{layer}", f"past_value.{layer}"]
        return names

    @property
    def output_names(self) -> list[str]:
        names = ["logits"]
        for layer in range(self.layers):
            names += [f"present_key.{layer}", f"present_value.{layer}"]
        return names

    def forward(self, input_ids, position_ids, seqlens_k, total_length, logit_positions, *past):
        if len(past) != 2 * self.layers:
            raise GraphoptError(f"a generation step of this model takes {2 * self.layers} cache buffers "
                                f"(keys and values of {self.layers} layers), got {len(past)}")
        state = _CacheState(past, seqlens_k, total_length)
        swap = _attention_modules_replaced(self.decoder, state, *self.rotary_tables()) \
            if self.rotary_inside else _attention_swapped(self.model)
        with swap:
            out = self.decoder(input_ids=input_ids, position_ids=position_ids, use_cache=False,
                               graphopt_cache=state)
        hidden = out[0]
        picked = hidden.gather(1, logit_positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        return (self.lm_head(picked), *state.present)


def _check_rotary_tables(computed, reference) -> None:
    for name, ours, theirs in zip(("cos", "sin"), computed, reference):
        error = float((ours - theirs).abs().max())
        if error > 1e-5:
            raise GraphoptError(f"rotary {name} table computed from inv_freq differs from the model's rotary module "
                                f"by {error:.2e}; this rope variant is not supported for generation")


def rotary_tables(decoder, positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [positions, D/2] from the model's own rotary module (its scaling included)."""
    dummy = torch.zeros(1, 1, dtype=torch.float32)
    with torch.no_grad():
        cos, sin = decoder.rotary_emb(dummy, position_ids=torch.arange(positions).unsqueeze(0))
    half = cos.shape[-1] // 2
    return cos[0, :, :half].float().contiguous(), sin[0, :, :half].float().contiguous()


def cache_shape(config, batch: int, capacity: int) -> tuple[int, int, int, int]:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return batch, int(config.num_key_value_heads), capacity, int(head_dim)


def prompt_inputs(config, input_ids: torch.Tensor, capacity: int | None = None, kept: int | None = None,
                  dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    """The inputs of a prompt call on full-length rows `input_ids` [B, S] with an empty cache of
    `capacity` positions (default S); logits at the last `kept` positions (default all)."""
    batch, seq = input_ids.shape
    capacity = capacity or seq
    kept = seq if kept is None else kept
    positions = torch.arange(seq).unsqueeze(0).expand(batch, seq).contiguous()
    keep = positions[:, seq - kept:]
    past = [torch.zeros(cache_shape(config, batch, capacity), dtype=dtype)
            for _ in range(2 * int(config.num_hidden_layers))]
    return (input_ids, positions, torch.full((batch,), seq - 1, dtype=torch.int32),
            torch.tensor(seq, dtype=torch.int32), keep.contiguous(), *past)


def example_inputs(config, cache_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    """Capture inputs: every dynamic dim at a distinct size >= 2 (torch.export specialises
    sizes 0 and 1 and must not see two dims equal by accident)."""
    ids = torch.randint(0, int(config.vocab_size), (2, 6), generator=torch.Generator().manual_seed(0))
    return prompt_inputs(config, ids, capacity=9, kept=3, dtype=cache_dtype)


def dynamic_dims(layers: int) -> dict[int, dict[int, str]]:
    """dynamic_dims for GenerationGraph inputs: batch, tokens, kept positions, cache capacity."""
    dims = {0: {0: "batch", 1: "tokens"}, 1: {0: "batch", 1: "tokens"}, 2: {0: "batch"},
            4: {0: "batch", 1: "kept"}}
    for i in range(2 * layers):
        dims[len(INPUT_NAMES) + i] = {0: "batch", 2: "capacity"}
    return dims
