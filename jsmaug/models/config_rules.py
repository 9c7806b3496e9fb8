"""What a `ModelConfig` may hold: the families, RoPE types, kernels and dtypes jsmaug implements, and the checks
that refuse every other value with an error naming the field (`validate`, run by `ModelConfig.__post_init__`).
A field of another family is refused too, so a config always means one HF architecture. Kept apart from
jsmaug/models/config.py (which re-exports the names) so that the config class stays a short read; this module
imports nothing of it (the checks read the config's fields and properties)."""

from __future__ import annotations

from jsmaug.errors import ConfigError

DENSE_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")
MOE_TYPES = ("mixtral", "qwen3_moe", "olmoe", "gpt_oss")
MODEL_TYPES = DENSE_TYPES + MOE_TYPES
ROPE_TYPES = ("default", "linear", "llama3", "yarn")
# The rope_* fields each rope_type reads (required, optional); every other rope_* field must stay None.
ROPE_FIELDS = {
    "default": ((), ()),
    "linear": (("rope_factor",), ()),
    "llama3": (("rope_factor", "rope_low_freq_factor", "rope_high_freq_factor",
                "rope_original_max_position_embeddings"), ()),
    "yarn": (("rope_factor", "rope_original_max_position_embeddings"),
             ("rope_beta_fast", "rope_beta_slow", "rope_truncate", "rope_attention_factor", "rope_mscale",
              "rope_mscale_all_dim")),
}
LAYER_TYPES = ("full_attention", "sliding_attention")  # HF's layer_types values jsmaug implements
MOE_IMPLS = ("auto", "dense", "blocked", "bucketed", "ragged", "megablox", "capacity")
ATTENTION_IMPLS = ("auto", "xla", "chunked", "cudnn", "splash")
# HF projection names; w1/w3/w2 are Mixtral's names of the experts' gate/up/down (the same targets).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "w1", "w3", "w2")
DTYPES = ("float32", "bfloat16", "float16")


def validate(c) -> None:
    """Raises ConfigError naming the first ModelConfig field that is out of range or belongs to another family."""
    def need(cond: bool, field: str, msg: str):
        if not cond:
            raise ConfigError(f"ModelConfig.{field}: {msg} (got {getattr(c, field)!r})")

    need(c.model_type in MODEL_TYPES, "model_type", f"must be one of {MODEL_TYPES}")
    for f in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "max_position_embeddings", "decoder_sparse_step"):
        need(isinstance(getattr(c, f), int) and getattr(c, f) > 0, f, "must be a positive integer")
    need(c.num_attention_heads % c.num_key_value_heads == 0, "num_key_value_heads",
         f"must divide num_attention_heads={c.num_attention_heads}")
    if c.head_dim is None:
        need(c.hidden_size % c.num_attention_heads == 0, "hidden_size",
             "must be divisible by num_attention_heads when head_dim is not given")
    else:
        need(isinstance(c.head_dim, int) and c.head_dim > 0 and c.head_dim % 2 == 0, "head_dim",
             "must be a positive even integer (RoPE rotates halves)")
    need(c.sliding_window is None or (isinstance(c.sliding_window, int) and c.sliding_window > 0),
         "sliding_window", "must be null or a positive integer")
    need(c.rms_norm_eps > 0, "rms_norm_eps", "must be > 0")
    need(c.rope_theta > 0, "rope_theta", "must be > 0")
    _check_rope(c, need)
    _check_family(c, need)
    _check_gemma(c, need)
    need(c.param_dtype in DTYPES, "param_dtype", f"must be one of {DTYPES}")
    need(c.dtype in DTYPES, "dtype", f"must be one of {DTYPES}")
    need(c.remat in ("none", "full", "minimal"), "remat", "must be none, full or minimal")
    need(isinstance(c.scan_unroll, int) and c.scan_unroll >= 1, "scan_unroll", "must be an integer >= 1")
    need(c.moe_impl in MOE_IMPLS, "moe_impl", f"must be one of {MOE_IMPLS}")
    need(c.moe_block_size > 0, "moe_block_size", "must be > 0")
    need(c.moe_capacity_factor > 0, "moe_capacity_factor", "must be > 0")
    need(c.moe_token_chunks > 0, "moe_token_chunks", "must be > 0")
    need(c.moe_dispatch in ("auto", "gspmd", "all_to_all"), "moe_dispatch", "must be auto, gspmd or all_to_all")
    need(isinstance(c.lora_rank, int) and c.lora_rank >= 0, "lora_rank", "must be an integer >= 0")
    need(c.lora_alpha > 0, "lora_alpha", "must be > 0")
    need(set(c.lora_targets) <= set(LORA_TARGETS) and len(c.lora_targets) > 0, "lora_targets",
         f"must be a non-empty subset of {LORA_TARGETS}")
    need(c.attention_impl in ATTENTION_IMPLS, "attention_impl", f"must be one of {ATTENTION_IMPLS}")
    need(c.attention_block_size > 0, "attention_block_size", "must be > 0")


def _check_rope(c, need) -> None:
    need(c.rope_type in ROPE_TYPES, "rope_type",
         f"rope_type {c.rope_type!r} is not supported; jsmaug implements {ROPE_TYPES}")
    required, optional = ROPE_FIELDS.get(c.rope_type, ((), ()))
    for f in sorted({f for r, o in ROPE_FIELDS.values() for f in r + o}):
        value = getattr(c, f)
        if f in required:
            need(value is not None and value > 0, f, f"rope_type {c.rope_type!r} needs a positive {f}")
        elif f not in optional:
            need(value is None, f, f"is not a parameter of rope_type {c.rope_type!r}")
        elif f == "rope_truncate":
            need(value in (None, True, False), f, "must be null, true or false")
        elif f in ("rope_beta_fast", "rope_beta_slow", "rope_attention_factor"):
            need(value is None or value > 0, f, "must be null or > 0")
    if c.rope_type == "llama3":
        need(c.rope_high_freq_factor != c.rope_low_freq_factor, "rope_high_freq_factor",
             "must differ from rope_low_freq_factor (llama3 interpolates between them)")


def _check_family(c, need) -> None:
    """A field of another family is refused here, so a config always means one HF architecture."""
    mt = c.model_type
    if not c.is_moe:
        for f in ("num_local_experts", "num_experts_per_tok"):
            need(getattr(c, f) == 0, f, f"model_type {mt!r} is a dense family (no experts); set 0, or "
                 f"pick an MoE model_type {MOE_TYPES}")
        need(not c.norm_topk_prob, "norm_topk_prob", f"model_type {mt!r} has no router")
        need(c.router_jitter_noise == 0, "router_jitter_noise", f"model_type {mt!r} has no router")
    else:
        need(isinstance(c.num_local_experts, int) and c.num_local_experts > 0, "num_local_experts",
             f"model_type {mt!r} needs a positive number of experts")
        need(isinstance(c.num_experts_per_tok, int) and 0 < c.num_experts_per_tok <= c.num_local_experts,
             "num_experts_per_tok", f"must be in 1..num_local_experts={c.num_local_experts}")
        need(c.router_aux_loss_coef >= 0, "router_aux_loss_coef", "must be >= 0")
    if mt == "qwen3_moe":
        need(isinstance(c.moe_intermediate_size, int) and c.moe_intermediate_size > 0,
             "moe_intermediate_size", "qwen3_moe needs the experts' width as a positive integer")
        need(all(isinstance(i, int) and 0 <= i < c.num_hidden_layers for i in c.mlp_only_layers),
             "mlp_only_layers", f"must list layer indices in 0..{c.num_hidden_layers - 1}")
    else:
        need(c.moe_intermediate_size is None, "moe_intermediate_size", f"is a qwen3_moe field, not {mt!r}'s")
        need(c.mlp_only_layers == (), "mlp_only_layers", f"is a qwen3_moe field, not {mt!r}'s")
        need(c.decoder_sparse_step == 1, "decoder_sparse_step", f"is a qwen3_moe field, not {mt!r}'s")
    if mt == "mixtral":
        need(c.norm_topk_prob is True, "norm_topk_prob", "Mixtral always renormalises its top-k weights")
    else:
        need(c.router_jitter_noise == 0, "router_jitter_noise", f"is a mixtral field, not {mt!r}'s")
    if mt == "gpt_oss":
        need(c.norm_topk_prob is True, "norm_topk_prob",
             "gpt_oss's softmax over the chosen experts' logits is the renormalised top-k")
        for f in ("swiglu_limit", "swiglu_alpha"):
            need(isinstance(getattr(c, f), (int, float)) and getattr(c, f) > 0, f, "must be > 0")
    else:
        for f in ("swiglu_limit", "swiglu_alpha"):
            need(getattr(c, f) is None, f, f"is a gpt_oss field, not {mt!r}'s")
    need(not (c.attention_bias and mt in ("mistral", "mixtral", "qwen2")), "attention_bias",
         f"{mt!r} has no attention_bias switch (qwen2: q/k/v biases always, no o bias; mistral/mixtral: none)")
    if mt == "olmoe":
        need(c.clip_qkv is None or c.clip_qkv > 0, "clip_qkv", "must be null or > 0")
    else:
        need(c.clip_qkv is None, "clip_qkv", f"is an olmoe field, not {mt!r}'s")
    need(c.sliding_window is None or mt not in ("llama", "olmoe"), "sliding_window",
         f"{mt!r} has no sliding window in HF")
    if mt == "olmoe":
        need(c.head_dim is None or c.head_dim * c.num_attention_heads == c.hidden_size, "head_dim",
             "olmoe's q/k norms assume head_dim = hidden_size // num_attention_heads")


def _check_gemma(c, need) -> None:
    """Gemma 3's fields, and the layer types it shares with gpt_oss."""
    if not c.is_gemma:
        for f in ("rope_local_base_freq", "query_pre_attn_scalar"):
            need(getattr(c, f) is None, f, f"is a gemma3_text field, not {c.model_type!r}'s")
    if c.model_type not in ("gemma3_text", "gpt_oss"):
        need(c.layer_types is None, "layer_types",
             f"is a gemma3_text field, not {c.model_type!r}'s (gpt_oss has it too)")
        return
    need(isinstance(c.layer_types, tuple) and len(c.layer_types) == c.num_hidden_layers, "layer_types",
         f"must list one type per layer ({c.num_hidden_layers})")
    unknown = sorted(set(c.layer_types) - set(LAYER_TYPES))
    need(not unknown, "layer_types", f"layer type(s) {unknown} are not supported; jsmaug implements {LAYER_TYPES}")
    if any(c.layer_sliding):
        need(isinstance(c.sliding_window, int) and c.sliding_window > 0, "sliding_window",
             "sliding_attention layers need a positive window")
    if not c.is_gemma:
        return
    need(c.rope_local_base_freq > 0, "rope_local_base_freq", "must be > 0")
    need(c.query_pre_attn_scalar > 0, "query_pre_attn_scalar", "must be > 0")
