"""Model configuration: `MixtralConfig`, with Hugging Face's field names.

The fields are exactly the names of transformers' `MixtralConfig`, so a `config.json` from the hub maps
onto it one to one (`from_hf_dict`) and back (`to_hf_dict`). Fields that only jsmaug knows about
(dtypes, remat, MoE dispatch) live beside them and are never written to `config.json`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

# Fields that HF's config.json carries and jsmaug reads.
_HF_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "num_local_experts", "num_experts_per_tok", "rms_norm_eps",
    "rope_theta", "sliding_window", "max_position_embeddings", "router_aux_loss_coef",
    "router_jitter_noise", "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id",
    "initializer_range",
)

MOE_IMPLS = ("auto", "dense", "blocked", "bucketed", "ragged", "megablox", "capacity")
ATTENTION_IMPLS = ("auto", "xla", "chunked", "cudnn", "splash")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "w1", "w3", "w2")
DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """A config (or config.json) that jsmaug cannot use; the message names the field."""


@dataclasses.dataclass(frozen=True)
class MixtralConfig:
    """Mixtral architecture (HF names) plus jsmaug's numerics and dispatch settings."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int | None = None  # None = hidden_size // num_attention_heads, as in HF
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1e6
    sliding_window: int | None = None
    max_position_embeddings: int = 32768
    router_aux_loss_coef: float = 0.02
    router_jitter_noise: float = 0.0
    tie_word_embeddings: bool = False
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int | None = None
    initializer_range: float = 0.02

    # --- jsmaug-only settings (not part of config.json) ---
    param_dtype: str = "float32"  # dtype parameters are stored in (master weights)
    dtype: str = "float32"  # compute dtype of matmuls; norms, router and softmax always run in float32
    remat: str = "none"  # "none" | "full" | "minimal" (save matmul outputs, recompute the rest)
    moe_impl: str = "auto"  # see jsmaug/models/moe.py
    moe_block_size: int = 128  # rows per block of the CPU grouped matmul
    moe_capacity_factor: float = 1.25  # only for moe_impl="capacity"
    moe_dispatch: str = "auto"  # gspmd | all_to_all | auto, see jsmaug/parallel/expert_parallel.py
    lora_rank: int = 0  # > 0: low-rank adapters on lora_targets (jsmaug/models/lora.py); part of the params' structure
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "w1", "w3", "w2")
    attention_impl: str = "auto"  # see jsmaug/models/attention.py
    attention_block_size: int = 512  # query and key block of the chunked attention

    def __post_init__(self):
        self.validate()

    # ------------------------------------------------------------------ derived
    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_attention_heads

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        def need(cond: bool, field: str, msg: str):
            if not cond:
                raise ConfigError(f"MixtralConfig.{field}: {msg} (got {getattr(self, field)!r})")

        for f in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "num_local_experts", "num_experts_per_tok",
                  "max_position_embeddings"):
            need(isinstance(getattr(self, f), int) and getattr(self, f) > 0, f, "must be a positive integer")
        need(self.num_attention_heads % self.num_key_value_heads == 0, "num_key_value_heads",
             f"must divide num_attention_heads={self.num_attention_heads}")
        need(self.num_experts_per_tok <= self.num_local_experts, "num_experts_per_tok",
             f"must be <= num_local_experts={self.num_local_experts}")
        if self.head_dim is None:
            need(self.hidden_size % self.num_attention_heads == 0, "hidden_size",
                 "must be divisible by num_attention_heads when head_dim is not given")
        else:
            need(isinstance(self.head_dim, int) and self.head_dim > 0 and self.head_dim % 2 == 0, "head_dim",
                 "must be a positive even integer (RoPE rotates halves)")
        need(self.sliding_window is None or (isinstance(self.sliding_window, int) and self.sliding_window > 0),
             "sliding_window", "must be null or a positive integer")
        need(self.rms_norm_eps > 0, "rms_norm_eps", "must be > 0")
        need(self.rope_theta > 0, "rope_theta", "must be > 0")
        need(self.param_dtype in DTYPES, "param_dtype", f"must be one of {DTYPES}")
        need(self.dtype in DTYPES, "dtype", f"must be one of {DTYPES}")
        need(self.remat in ("none", "full", "minimal"), "remat", "must be none, full or minimal")
        need(self.moe_impl in MOE_IMPLS, "moe_impl", f"must be one of {MOE_IMPLS}")
        need(self.moe_block_size > 0, "moe_block_size", "must be > 0")
        need(self.moe_capacity_factor > 0, "moe_capacity_factor", "must be > 0")
        need(self.moe_dispatch in ("auto", "gspmd", "all_to_all"), "moe_dispatch", "must be auto, gspmd or all_to_all")
        need(isinstance(self.lora_rank, int) and self.lora_rank >= 0, "lora_rank", "must be an integer >= 0")
        need(self.lora_alpha > 0, "lora_alpha", "must be > 0")
        need(set(self.lora_targets) <= set(LORA_TARGETS) and len(self.lora_targets) > 0, "lora_targets",
             f"must be a non-empty subset of {LORA_TARGETS}")
        need(self.attention_impl in ATTENTION_IMPLS, "attention_impl", f"must be one of {ATTENTION_IMPLS}")
        need(self.attention_block_size > 0, "attention_block_size", "must be > 0")

    def replace(self, **kw) -> "MixtralConfig":
        return dataclasses.replace(self, **kw)

    # ------------------------------------------------------------------ HF config.json
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json", **overrides) -> "MixtralConfig":
        """Builds a config from an HF `config.json` dict (hub form or transformers-5 form)."""
        arch = d.get("architectures") or ["MixtralForCausalLM"]
        model_type = d.get("model_type", "mixtral")
        if model_type != "mixtral" or "MixtralForCausalLM" not in arch:
            raise ConfigError(
                f"{source}: model_type={model_type!r}, architectures={arch!r}; jsmaug reads only "
                "MixtralForCausalLM checkpoints (model_type 'mixtral')")
        kw: dict[str, Any] = {}
        for f in _HF_FIELDS:
            if f in d:
                kw[f] = d[f]
        # transformers 5 writes rope_parameters instead of a top-level rope_theta.
        if "rope_theta" not in kw and isinstance(d.get("rope_parameters"), dict):
            rp = d["rope_parameters"]
            if rp.get("rope_type", "default") != "default":
                raise ConfigError(f"{source}: rope_parameters.rope_type={rp.get('rope_type')!r} is not supported")
            if "rope_theta" in rp:
                kw["rope_theta"] = rp["rope_theta"]
        if isinstance(d.get("rope_scaling"), dict) and d["rope_scaling"].get("rope_type", d["rope_scaling"].get("type")) not in (None, "default"):
            raise ConfigError(f"{source}: rope_scaling={d['rope_scaling']!r} is not supported")
        if isinstance(kw.get("eos_token_id"), list):
            kw["eos_token_id"] = kw["eos_token_id"][0]
        for f in ("rope_theta", "rms_norm_eps", "router_aux_loss_coef", "router_jitter_noise", "initializer_range"):
            if f in kw and kw[f] is not None:
                kw[f] = float(kw[f])
        kw.update(overrides)
        try:
            return cls(**kw)
        except TypeError as e:  # pragma: no cover - defensive
            raise ConfigError(f"{source}: {e}") from e
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from e

    def to_hf_dict(self, torch_dtype: str | None = None) -> dict[str, Any]:
        """The hub form of config.json (plus transformers-5's rope_parameters, so every reader finds its key)."""
        d: dict[str, Any] = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral"}
        for f in _HF_FIELDS:
            d[f] = getattr(self, f)
        d["head_dim"] = self.resolved_head_dim
        d["hidden_act"] = "silu"
        d["attention_dropout"] = 0.0
        d["output_router_logits"] = False
        d["use_cache"] = True
        d["rope_parameters"] = {"rope_theta": self.rope_theta, "rope_type": "default"}
        d["torch_dtype"] = torch_dtype or self.param_dtype
        return d

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MixtralConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown model config key(s): {unknown}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})  # JSON lists -> tuples

    # ------------------------------------------------------------------ sizes
    def num_params(self) -> int:
        d, i, v, e = self.hidden_size, self.intermediate_size, self.vocab_size, self.num_local_experts
        hd, hq, hkv = self.resolved_head_dim, self.num_attention_heads, self.num_key_value_heads
        attn = d * hd * (hq + 2 * hkv) + hq * hd * d
        moe = d * e + e * 3 * d * i
        per_layer = attn + moe + 2 * d
        return v * d * (1 if self.tie_word_embeddings else 2) + self.num_hidden_layers * per_layer + d


def mixtral_8x7b(**overrides) -> MixtralConfig:
    """The released Mixtral-8x7B-v0.1 shapes (the base of Smaug-Mixtral-v0.1)."""
    kw = dict(param_dtype="bfloat16", dtype="bfloat16")
    kw.update(overrides)
    return MixtralConfig(**kw)


def tiny(**overrides) -> MixtralConfig:
    """A Mixtral-shaped model small enough for CPU unit tests (all code paths, no cost)."""
    kw = dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=256,
              rope_theta=1e6, moe_block_size=8)
    kw.update(overrides)
    return MixtralConfig(**kw)


PRESETS = {"mixtral_8x7b": mixtral_8x7b, "tiny": tiny}


def preset(name: str, **overrides) -> MixtralConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name](**overrides)
