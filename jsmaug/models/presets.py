"""Model presets: the hub's shapes of released models as `ModelConfig`s (`model.preset:` in a run config).

Each preset takes keyword overrides (any `ModelConfig` field) and stores and computes in bfloat16 unless told
otherwise; `tiny` is the CPU test model. `jsmaug.models.config` re-exports every name here, so
`from jsmaug.models.config import preset, tiny` keeps working.
"""

from __future__ import annotations

from jsmaug.models.config import DENSE_TYPES, ConfigError, ModelConfig


def _released(kw: dict, overrides: dict) -> ModelConfig:
    kw = dict(kw, param_dtype="bfloat16", dtype="bfloat16")
    kw.update(overrides)
    return ModelConfig(**kw)


def mixtral_8x7b(**overrides) -> ModelConfig:
    """The released Mixtral-8x7B-v0.1 shapes (the base of Smaug-Mixtral-v0.1): ModelConfig's defaults."""
    return _released({}, overrides)


def mixtral_8x22b(**overrides) -> ModelConfig:
    """Mixtral-8x22B-v0.1's shapes (its HF config.json): 56 layers, 8 experts of 16384 at hidden 6144, top-2."""
    return _released(dict(
        vocab_size=32768, hidden_size=6144, intermediate_size=16384, num_hidden_layers=56, num_attention_heads=48,
        num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2, rope_theta=1e6,
        max_position_embeddings=65536, rms_norm_eps=1e-5, router_aux_loss_coef=0.001), overrides)


# Meta-Llama-3-8B's config.json (LlamaForCausalLM): GQA 32 / 8 heads of 128, SwiGLU 14336, untied 128256 vocab.
_LLAMA3_8B = dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                  num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5,
                  rope_theta=500000.0, max_position_embeddings=8192, tie_word_embeddings=False,
                  bos_token_id=128000, eos_token_id=128001)


def llama3_8b(**overrides) -> ModelConfig:
    """Meta-Llama-3-8B's shapes (8.03B): 32 layers at hidden 4096, 32 heads / 8 KV heads, MLP 14336, vocab
    128256, RoPE theta 500000, 8192 positions. For the Instruct model set eos_token_id=128009 (<|eot_id|>)."""
    return _released(_LLAMA3_8B, overrides)


def llama3_1_8b(**overrides) -> ModelConfig:
    """Llama-3.1-8B's shapes: Llama-3-8B's, with llama3 RoPE scaling (factor 8 over 8192 original positions,
    low / high frequency factors 1 and 4) to 131072 positions."""
    return _released(dict(_LLAMA3_8B, rope_type="llama3", rope_factor=8.0, rope_low_freq_factor=1.0,
                          rope_high_freq_factor=4.0, rope_original_max_position_embeddings=8192,
                          max_position_embeddings=131072), overrides)


def qwen3_8b(**overrides) -> ModelConfig:
    """Qwen3-8B's shapes (8.19B): 36 layers at hidden 4096, 32 heads / 8 KV heads of 128 with per-head q/k
    norms, MLP 12288, untied vocab 151936, RoPE theta 1e6, RMSNorm eps 1e-6, 40960 positions."""
    return _released(dict(
        model_type="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6, rope_theta=1e6,
        max_position_embeddings=40960, tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151645),
        overrides)


_QWEN3_MOE = dict(model_type="qwen3_moe", vocab_size=151936, head_dim=128, num_key_value_heads=4,
                  num_local_experts=128, num_experts_per_tok=8, norm_topk_prob=True, rope_theta=1e6,
                  rms_norm_eps=1e-6, max_position_embeddings=40960, router_aux_loss_coef=0.001,
                  tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151645)


def qwen3_30b_a3b(**overrides) -> ModelConfig:
    """Qwen3-30B-A3B's shapes: 48 layers, 128 experts of 768 at hidden 2048, top-8 renormalised, q/k norms."""
    return _released(dict(_QWEN3_MOE, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                          num_hidden_layers=48, num_attention_heads=32), overrides)


def qwen3_235b_a22b(**overrides) -> ModelConfig:
    """Qwen3-235B-A22B's shapes: 94 layers, 128 experts of 1536 at hidden 4096, top-8 renormalised."""
    return _released(dict(_QWEN3_MOE, hidden_size=4096, intermediate_size=12288, moe_intermediate_size=1536,
                          num_hidden_layers=94, num_attention_heads=64), overrides)


def olmoe_1b_7b(**overrides) -> ModelConfig:
    """OLMoE-1B-7B-0924's shapes: 16 layers, 64 experts of 1024 at hidden 2048, top-8 not renormalised, q/k
    norms over the whole projection."""
    return _released(dict(
        model_type="olmoe", vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=16,
        num_attention_heads=16, num_key_value_heads=16, num_local_experts=64, num_experts_per_tok=8,
        norm_topk_prob=False, rope_theta=1e4, rms_norm_eps=1e-5, max_position_embeddings=4096,
        router_aux_loss_coef=0.01, tie_word_embeddings=False, bos_token_id=None, eos_token_id=50279,
        pad_token_id=1), overrides)


# openai/gpt-oss-20b's config.json (GptOssForCausalLM): 64 heads of 64 / 8 KV heads with biases and sinks, layers
# alternating a 128-token window and full attention, yarn RoPE (32x over 4096 positions, theta 150000), experts of
# 2880 with biases, the clamped SwiGLU (limit 7, alpha 1.702), untied 201088 vocab.
_GPT_OSS = dict(model_type="gpt_oss", vocab_size=201088, hidden_size=2880, intermediate_size=2880,
                num_attention_heads=64, num_key_value_heads=8, head_dim=64, attention_bias=True, num_experts_per_tok=4,
                rms_norm_eps=1e-5, rope_theta=150000.0, rope_type="yarn", rope_factor=32.0, rope_beta_fast=32.0,
                rope_beta_slow=1.0, rope_truncate=False, rope_original_max_position_embeddings=4096,
                sliding_window=128, max_position_embeddings=131072, swiglu_limit=7.0, swiglu_alpha=1.702,
                router_aux_loss_coef=0.9, tie_word_embeddings=False, bos_token_id=None, eos_token_id=200002,
                pad_token_id=199999)


def gpt_oss_20b(**overrides) -> ModelConfig:
    """openai/gpt-oss-20b's shapes (20.91B; 3.6B active): 24 layers at hidden 2880, 32 experts of 2880, top-4.
    The hub stores its experts in MXFP4; the importer dequantizes them (docs/conversion.md)."""
    return _released(dict(_GPT_OSS, num_hidden_layers=24, num_local_experts=32), overrides)


def gpt_oss_120b(**overrides) -> ModelConfig:
    """openai/gpt-oss-120b's shapes (116.83B; 5.1B active): 36 layers at hidden 2880, 128 experts of 2880, top-4."""
    return _released(dict(_GPT_OSS, num_hidden_layers=36, num_local_experts=128), overrides)


def tiny(**overrides) -> ModelConfig:
    """A model small enough for CPU unit tests (all code paths, no cost): Mixtral-shaped, or of the family
    `model_type=` names."""
    kw = dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=256,
              rope_theta=1e6, moe_block_size=8)
    model_type = overrides.get("model_type", "mixtral")
    if model_type in DENSE_TYPES:  # no experts: the family's own defaults (0)
        del kw["num_local_experts"], kw["num_experts_per_tok"]
    if model_type == "qwen3_moe":
        kw["moe_intermediate_size"] = 24
    if model_type == "gpt_oss":  # its layers alternate a window of 4 and full attention (HF's default pattern)
        kw.update(head_dim=8, sliding_window=4, attention_bias=True)
    kw.update(overrides)
    return ModelConfig(**kw)


PRESETS = {"mixtral_8x7b": mixtral_8x7b, "mixtral_8x22b": mixtral_8x22b, "qwen3_30b_a3b": qwen3_30b_a3b,
           "qwen3_235b_a22b": qwen3_235b_a22b, "olmoe_1b_7b": olmoe_1b_7b, "llama3_8b": llama3_8b,
           "llama3_1_8b": llama3_1_8b, "qwen3_8b": qwen3_8b, "gpt_oss_20b": gpt_oss_20b,
           "gpt_oss_120b": gpt_oss_120b, "tiny": tiny}


def preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name](**overrides)
