"""Model configuration: `ModelConfig`, one decoder for every supported Hugging Face family
(`MODEL_TYPES`), with HF's field names.

`model_type` picks the family (llama, mistral, qwen2, qwen3, gemma3_text: dense; mixtral, qwen3_moe, olmoe,
gpt_oss: sparse MoE) and every switch the decoder reads is either an HF field (`attention_bias`, `head_dim`,
`tie_word_embeddings`, `sliding_window`, `layer_types`, `num_local_experts`, `norm_topk_prob`, `swiglu_limit`, ...)
or follows from the family (`qk_norm`, `qkv_bias`, `o_bias`, `sparse_layers`, `is_gemma`, `layer_sliding`,
`attention_sinks`, `router_bias`, `expert_bias`). MoE, Gemma and gpt-oss fields left at None take the family's HF
default.
`jsmaug/models/families.py` reads and writes each family's `config.json` (`families.from_hf_dict` /
`families.to_hf_dict`). Fields that only jsmaug knows about (dtypes, remat, MoE dispatch, LoRA) live beside them and are
never written to `config.json`. `MixtralConfig` is the class's former name, kept as an alias of `ModelConfig` so
users' code keeps working (it is not transformers' `MixtralConfig`).
The presets of released models (`preset`, `tiny`, `llama3_8b`, ...) live in `jsmaug/models/presets.py` and
are importable from here too.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jsmaug.errors import ConfigError  # noqa: F401 - re-exported (jsmaug.ConfigError)

from jsmaug.models import config_rules
# The accepted values, defined with their checks in jsmaug/models/config_rules.py; importable from here as before.
DENSE_TYPES, MOE_TYPES, MODEL_TYPES = config_rules.DENSE_TYPES, config_rules.MOE_TYPES, config_rules.MODEL_TYPES
ROPE_TYPES, ROPE_FIELDS, LAYER_TYPES = config_rules.ROPE_TYPES, config_rules.ROPE_FIELDS, config_rules.LAYER_TYPES
MOE_IMPLS, ATTENTION_IMPLS = config_rules.MOE_IMPLS, config_rules.ATTENTION_IMPLS
LORA_TARGETS, DTYPES = config_rules.LORA_TARGETS, config_rules.DTYPES

# HF defaults per MoE family for the fields left at None (transformers 5's config classes; Mixtral keeps
# jsmaug's released-8x7B values). Dense families have no experts.
_MOE_DEFAULTS = {
    "mixtral": dict(num_local_experts=8, num_experts_per_tok=2, router_aux_loss_coef=0.02, norm_topk_prob=True),
    "qwen3_moe": dict(num_local_experts=128, num_experts_per_tok=8, router_aux_loss_coef=0.001,
                      norm_topk_prob=False, moe_intermediate_size=768),
    "olmoe": dict(num_local_experts=64, num_experts_per_tok=8, router_aux_loss_coef=0.01, norm_topk_prob=False),
    # gpt_oss: a softmax over the k chosen logits, i.e. the top-k softmax probabilities renormalised.
    "gpt_oss": dict(num_local_experts=128, num_experts_per_tok=4, router_aux_loss_coef=0.001, norm_topk_prob=True),
}
_DENSE_DEFAULTS = dict(num_local_experts=0, num_experts_per_tok=0, router_aux_loss_coef=0.0, norm_topk_prob=False)
# Gemma3TextConfig's defaults for its own fields (transformers 5): every 6th layer global, the others local.
_GEMMA3_DEFAULTS = dict(query_pre_attn_scalar=256, rope_local_base_freq=10000.0, sliding_window=4096)
GEMMA3_SLIDING_WINDOW_PATTERN = 6
# GptOssConfig's defaults for its own fields (transformers 5): layers alternate sliding (even) and full (odd).
_GPT_OSS_DEFAULTS = dict(swiglu_limit=7.0, swiglu_alpha=1.702, sliding_window=128)
GPT_OSS_SLIDING_WINDOW_PATTERN = 2


def layer_types_from_pattern(num_layers: int, pattern: int) -> tuple[str, ...]:
    """HF's older `sliding_window_pattern`: layer i is global iff (i + 1) % pattern == 0."""
    return tuple("sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(num_layers))


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A decoder of one HF family (HF names) plus jsmaug's numerics and dispatch settings."""

    model_type: str = "mixtral"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 14336  # the dense MLP's width; Mixtral's and OLMoE's experts' too
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int | None = None  # None = hidden_size // num_attention_heads, as in HF
    attention_bias: bool = False  # llama/qwen3/qwen3_moe/olmoe: bias on q, k, v, o (qwen2: q, k, v always)
    clip_qkv: float | None = None  # olmoe: q, k, v clamped to [-clip_qkv, clip_qkv]
    num_local_experts: int | None = None  # 0 = dense MLP (HF qwen3_moe / olmoe call it num_experts)
    num_experts_per_tok: int | None = None
    moe_intermediate_size: int | None = None  # qwen3_moe: the experts' width (intermediate_size: dense layers)
    norm_topk_prob: bool | None = None  # renormalise the top-k router weights (mixtral: always)
    decoder_sparse_step: int = 1  # qwen3_moe: layer i is sparse iff (i + 1) % step == 0 ...
    mlp_only_layers: tuple[int, ...] = ()  # ... and i is not listed here
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1e6
    rope_type: str = "default"  # default | linear | llama3 | yarn (HF rope_parameters.rope_type)
    rope_factor: float | None = None  # rope_parameters.factor (linear, llama3, yarn)
    rope_low_freq_factor: float | None = None  # llama3
    rope_high_freq_factor: float | None = None  # llama3
    rope_original_max_position_embeddings: int | None = None  # llama3, yarn
    # yarn's optional rope_parameters (None: HF's default, noted): beta_fast (32) and beta_slow (1) bound the
    # interpolated band, truncate (True) rounds it to whole dimensions, attention_factor (None: from factor, and
    # mscale / mscale_all_dim when both are set) scales cos and sin.
    rope_beta_fast: float | None = None
    rope_beta_slow: float | None = None
    rope_truncate: bool | None = None
    rope_attention_factor: float | None = None
    rope_mscale: float | None = None
    rope_mscale_all_dim: float | None = None
    sliding_window: int | None = None
    # gemma3_text, gpt_oss: per layer "sliding_attention" (local: the window; Gemma: RoPE base rope_local_base_freq)
    # or "full_attention" (global: no window, the rope_* fields above). None: every layer alike (the window, if any).
    layer_types: tuple[str, ...] | None = None
    rope_local_base_freq: float | None = None  # gemma3_text: the local layers' RoPE theta (rope_type default)
    query_pre_attn_scalar: float | None = None  # gemma3_text: attention scores scaled by this ** -0.5
    # gpt_oss's experts: gate = min(gate, limit), up = clip(up, -limit, limit), (up + 1) * gate * sigmoid(alpha gate)
    swiglu_limit: float | None = None
    swiglu_alpha: float | None = None
    max_position_embeddings: int = 32768
    router_aux_loss_coef: float | None = None
    router_jitter_noise: float = 0.0
    output_router_logits: bool = False  # HF's switch; jsmaug's training adds the aux loss whatever it says
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 2
    pad_token_id: int | None = None
    initializer_range: float = 0.02

    # --- jsmaug-only settings (not part of config.json) ---
    param_dtype: str = "float32"  # dtype parameters are stored in (master weights)
    dtype: str = "float32"  # compute dtype of matmuls; norms, router and softmax always run in float32
    remat: str = "none"  # "none" | "full" | "minimal" (save matmul outputs, recompute the rest)
    scan_unroll: int = 1  # layers per iteration of the layer scan: 1 a loop, >= the layer count no loop at all
    moe_impl: str = "auto"  # see jsmaug/models/moe.py
    moe_block_size: int = 128  # rows per block of the CPU grouped matmul
    moe_capacity_factor: float = 1.25  # only for moe_impl="capacity"
    moe_token_chunks: int = 1  # each MoE layer's tokens in this many chunks, one at a time, each rematerialised
    moe_dispatch: str = "auto"  # gspmd | all_to_all | auto, see jsmaug/parallel/expert_parallel.py
    lora_rank: int = 0  # > 0: low-rank adapters on lora_targets (jsmaug/models/lora.py); part of the params' structure
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "w1", "w3", "w2")
    attention_impl: str = "auto"  # see jsmaug/models/attention.py
    attention_block_size: int = 512  # query and key block of the chunked attention
    # The attention mask also lets shared-prompt units' branches see their prompt (jsmaug/segments.py); set by a run
    # with data.share_prompt. Off, the mask's program is the plain segment-id one.
    shared_prompt_masks: bool = False

    def __post_init__(self):
        defaults = _MOE_DEFAULTS.get(self.model_type, _DENSE_DEFAULTS)
        for name, value in defaults.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        if self.model_type == "gemma3_text":
            for name, value in _GEMMA3_DEFAULTS.items():
                if getattr(self, name) is None:
                    object.__setattr__(self, name, value)
            if self.layer_types is None:
                object.__setattr__(self, "layer_types", layer_types_from_pattern(
                    self.num_hidden_layers, GEMMA3_SLIDING_WINDOW_PATTERN))
        if self.model_type == "gpt_oss":
            for name, value in _GPT_OSS_DEFAULTS.items():
                if getattr(self, name) is None:
                    object.__setattr__(self, name, value)
            if self.layer_types is None:
                object.__setattr__(self, "layer_types", layer_types_from_pattern(
                    self.num_hidden_layers, GPT_OSS_SLIDING_WINDOW_PATTERN))
        if isinstance(self.layer_types, list):
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        if isinstance(self.mlp_only_layers, list):
            object.__setattr__(self, "mlp_only_layers", tuple(self.mlp_only_layers))
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        self.validate()

    # ------------------------------------------------------------------ derived
    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_attention_heads

    @property
    def is_moe(self) -> bool:
        return self.model_type in MOE_TYPES

    @property
    def expert_intermediate_size(self) -> int:
        return self.moe_intermediate_size if self.model_type == "qwen3_moe" else self.intermediate_size

    @property
    def qk_norm(self) -> str:
        """'head': RMSNorm over head_dim of each head (qwen3, qwen3_moe, gemma3_text); 'projection': over the
        whole q / k projection (olmoe); 'none'."""
        return {"qwen3": "head", "qwen3_moe": "head", "gemma3_text": "head",
                "olmoe": "projection"}.get(self.model_type, "none")

    @property
    def is_gemma(self) -> bool:
        """Gemma's switches: RMSNorm weights w applied as (1 + w), four norms per layer (the attention's and the
        MLP's outputs normalised before the residual add), GeGLU (tanh GELU), the embedding times
        sqrt(hidden_size), attention scaled by query_pre_attn_scalar ** -0.5, local and global layers."""
        return self.model_type == "gemma3_text"

    @property
    def norm_offset(self) -> float:
        """RMSNorm multiplies by (norm_offset + weight): 1 for Gemma (weights stored around 0), else 0."""
        return 1.0 if self.is_gemma else 0.0

    @property
    def norm_weight_in_float32(self) -> bool:
        """RMSNorm multiplies by its weight in float32 and then casts (HF's Gemma3RMSNorm and GptOssRMSNorm), where
        the other families cast the normalised values to the compute dtype first and multiply there (Llama's
        form). The same in float32; in bfloat16 the two round differently."""
        return self.is_gemma or self.model_type == "gpt_oss"

    @property
    def hidden_act(self) -> str:
        """The MLP's gate activation, by HF's name."""
        return "gelu_pytorch_tanh" if self.is_gemma else "silu"

    @property
    def layer_sliding(self) -> tuple[bool, ...]:
        """Per layer, whether its attention has the sliding window (and, for Gemma, the local RoPE base)."""
        if self.layer_types is not None:
            return tuple(t == "sliding_attention" for t in self.layer_types)
        return (self.sliding_window is not None,) * self.num_hidden_layers

    @property
    def mixed_attention(self) -> bool:
        """Local and global layers in one stack: each layer picks its window and RoPE table at run time."""
        return len(set(self.layer_sliding)) > 1

    @property
    def attention_window(self) -> int | None:
        """The window of every layer when all layers are alike (None: no window or mixed layers)."""
        return self.sliding_window if all(self.layer_sliding) else None

    @property
    def attention_sinks(self) -> bool:
        """One learned logit per query head (`self_attn/sinks`) in each softmax's denominator (gpt_oss)."""
        return self.model_type == "gpt_oss"

    @property
    def router_bias(self) -> bool:
        """A bias `gate_bias` (E,) on the router's logits (gpt_oss)."""
        return self.model_type == "gpt_oss"

    @property
    def expert_bias(self) -> bool:
        """Biases on the experts' projections: `w1_bias`, `w3_bias` (E, F) and `w2_bias` (E, D) (gpt_oss)."""
        return self.model_type == "gpt_oss"

    @property
    def qkv_bias(self) -> bool:
        return self.attention_bias or self.model_type == "qwen2"

    @property
    def o_bias(self) -> bool:
        return self.attention_bias and self.model_type != "qwen2"

    @property
    def sparse_layers(self) -> tuple[bool, ...]:
        """Per layer, whether its MLP is the sparse MoE block (HF's rule, Qwen3MoeDecoderLayer)."""
        if not self.is_moe:
            return (False,) * self.num_hidden_layers
        return tuple(i not in self.mlp_only_layers and (i + 1) % self.decoder_sparse_step == 0
                     for i in range(self.num_hidden_layers))

    def validate(self) -> None:
        config_rules.validate(self)  # the accepted values and their checks: jsmaug/models/config_rules.py

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown model config key(s): {unknown}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})  # JSON lists -> tuples

    # ------------------------------------------------------------------ sizes
    def num_params(self) -> int:
        d, v, e = self.hidden_size, self.vocab_size, self.num_local_experts
        hd, hq, hkv = self.resolved_head_dim, self.num_attention_heads, self.num_key_value_heads
        attn = d * hd * (hq + 2 * hkv) + hq * hd * d
        attn += hd * (hq + 2 * hkv) * self.qkv_bias + d * self.o_bias
        attn += {"head": 2 * hd, "projection": hd * (hq + hkv)}.get(self.qk_norm, 0)
        attn += hq * self.attention_sinks
        f = self.expert_intermediate_size
        sparse = d * e + e * 3 * d * f + e * self.router_bias + e * (2 * f + d) * self.expert_bias if self.is_moe else 0
        dense = 3 * d * self.intermediate_size
        mlps = sum(sparse if s else dense for s in self.sparse_layers)
        norms = 4 if self.is_gemma else 2
        return (v * d * (1 if self.tie_word_embeddings else 2) + self.num_hidden_layers * (attn + norms * d)
                + mlps + d)


# The class's former name, from when Mixtral was its only family: kept so users' code
# (`jsmaug.MixtralConfig(...)`, pickles, isinstance checks) keeps working. The same class, not a subclass.
MixtralConfig = ModelConfig

def layer_groups(config: ModelConfig) -> list[tuple[str, bool, tuple[int, ...]]]:
    """The stacks of layers in the params: (name under params["layers"], sparse?, HF layer indices). One stack
    `layer` when every layer is of one kind, else `dense_layer` and `sparse_layer`."""
    kinds = config.sparse_layers
    if len(set(kinds)) == 1:
        return [("layer", kinds[0], tuple(range(config.num_hidden_layers)))]
    return [(name, sparse, tuple(i for i, s in enumerate(kinds) if s == sparse))
            for name, sparse in (("dense_layer", False), ("sparse_layer", True))]


def layer_segments(config: ModelConfig) -> list[tuple[str, bool, int, int, int]]:
    """Runs of consecutive layers of one kind, in order: (group, sparse?, start, stop within the group's stack,
    first HF layer). Each run is one scan over a slice of its group's stack."""
    where = {}
    for name, sparse, idx in layer_groups(config):
        for j, n in enumerate(idx):
            where[n] = (name, sparse, j)
    out: list[list] = []
    for n in range(config.num_hidden_layers):
        name, sparse, j = where[n]
        if out and out[-1][0] == name:
            out[-1][3] = j + 1
        else:
            out.append([name, sparse, j, j + 1, n])
    return [tuple(s) for s in out]


# The presets live in jsmaug/models/presets.py (which imports this module); their names stay importable from here,
# resolved on first use so that neither module imports the other at import time.
PRESET_NAMES = ("PRESETS", "preset", "tiny", "mixtral_8x7b", "mixtral_8x22b", "qwen3_30b_a3b", "qwen3_235b_a22b",
                "olmoe_1b_7b", "llama3_8b", "llama3_1_8b", "qwen3_8b", "gpt_oss_20b", "gpt_oss_120b")


def __getattr__(name: str):
    if name in PRESET_NAMES:
        from jsmaug.models import presets

        return getattr(presets, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
