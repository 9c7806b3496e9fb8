"""Each Hugging Face family's `config.json`, read into a `ModelConfig` and written back.

One table per family says which HF fields it has; `from_hf_dict` reads them (the hub's older form with a
top-level `rope_theta` + `rope_scaling`, and transformers-5's `rope_parameters`), fills what a file leaves out
with transformers' own defaults for that class, and refuses what jsmaug does not implement with an error that
names the file and the field: an unknown `model_type`, a `rope_type` other than default/linear/llama3/yarn (and a
yarn key HF's yarn does not list), fields of
two families in one file, an activation other than the family's, per-layer sliding windows outside Gemma 3, an
unknown `layer_types` value, logit softcapping. `to_hf_dict` writes the class's own
fields (its architecture, `model_type`, the RoPE in both forms) so transformers 4.x and 5 both load it.
"""

from __future__ import annotations

from typing import Any

from jsmaug.models.config import (GEMMA3_SLIDING_WINDOW_PATTERN, GPT_OSS_SLIDING_WINDOW_PATTERN, LAYER_TYPES,
                                  MOE_TYPES, ROPE_FIELDS, ROPE_TYPES, ConfigError, ModelConfig,
                                  layer_types_from_pattern)

ARCHITECTURES = {
    "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM", "mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
    "olmoe": "OlmoeForCausalLM", "gemma3_text": "Gemma3ForCausalLM", "gpt_oss": "GptOssForCausalLM",
}

_COMMON = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
           "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings",
           "bos_token_id", "eos_token_id", "pad_token_id", "initializer_range")
_MOE = ("num_experts_per_tok", "router_aux_loss_coef", "output_router_logits")
# The fields each family's HF config class has beyond the common ones (and the RoPE).
_FIELDS = {
    "llama": ("attention_bias",),
    "mistral": ("sliding_window",),
    "qwen2": (),
    "qwen3": ("attention_bias",),
    "mixtral": ("sliding_window", "num_local_experts", "router_jitter_noise") + _MOE,
    "qwen3_moe": ("attention_bias", "moe_intermediate_size", "norm_topk_prob", "decoder_sparse_step",
                  "mlp_only_layers") + _MOE,
    "olmoe": ("attention_bias", "clip_qkv", "norm_topk_prob") + _MOE,
    "gemma3_text": ("attention_bias", "query_pre_attn_scalar"),  # + layer_types, windows, RoPE: _gemma3
    "gpt_oss": ("attention_bias", "num_local_experts", "swiglu_limit", "swiglu_alpha") + _MOE,  # + _gpt_oss
}
# Fields that only some families have: one of them in another family's file means the file mixes two.
_OWNERS = {
    "num_local_experts": MOE_TYPES, "num_experts": ("qwen3_moe", "olmoe", "gpt_oss"), "num_experts_per_tok": MOE_TYPES,
    "experts_per_token": ("gpt_oss",), "swiglu_limit": ("gpt_oss",), "swiglu_alpha": ("gpt_oss",),
    "moe_intermediate_size": ("qwen3_moe",), "norm_topk_prob": ("qwen3_moe", "olmoe"),
    "decoder_sparse_step": ("qwen3_moe",), "mlp_only_layers": ("qwen3_moe",), "router_jitter_noise": ("mixtral",),
    "clip_qkv": ("olmoe",), "query_pre_attn_scalar": ("gemma3_text",), "rope_local_base_freq": ("gemma3_text",),
}
# transformers' defaults for fields a config.json may leave out (the ones that change the numbers).
_HF_DEFAULTS = {
    "llama": dict(rms_norm_eps=1e-6, rope_theta=1e4, max_position_embeddings=2048),
    "mistral": dict(rms_norm_eps=1e-6, rope_theta=1e4, max_position_embeddings=131072, sliding_window=4096),
    "qwen2": dict(rms_norm_eps=1e-6, rope_theta=1e4, max_position_embeddings=32768),
    "qwen3": dict(rms_norm_eps=1e-6, rope_theta=1e4, max_position_embeddings=32768),
    "mixtral": dict(rms_norm_eps=1e-5, rope_theta=1e6, max_position_embeddings=131072),
    "qwen3_moe": dict(rms_norm_eps=1e-6, rope_theta=1e4, max_position_embeddings=32768),
    "olmoe": dict(rms_norm_eps=1e-5, rope_theta=1e4, max_position_embeddings=4096),
    "gemma3_text": dict(rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=131072, sliding_window=4096,
                        rope_local_base_freq=1e4, query_pre_attn_scalar=256, head_dim=256),
    "gpt_oss": dict(rms_norm_eps=1e-5, rope_theta=150000.0, max_position_embeddings=131072, sliding_window=128,
                    head_dim=64, attention_bias=True, num_hidden_layers=36),
}
# GptOssConfig's RoPE when a file has none (transformers 5): yarn, 32x over 4096 positions, not truncated.
_GPT_OSS_ROPE = dict(rope_type="yarn", factor=32.0, beta_fast=32.0, beta_slow=1.0, truncate=False,
                     original_max_position_embeddings=4096)
# HF's rope_parameters keys -> ModelConfig fields (config.ROPE_FIELDS says which rope_type reads which).
_ROPE_KEYS = {"factor": "rope_factor", "low_freq_factor": "rope_low_freq_factor",
              "high_freq_factor": "rope_high_freq_factor",
              "original_max_position_embeddings": "rope_original_max_position_embeddings",
              "beta_fast": "rope_beta_fast", "beta_slow": "rope_beta_slow", "truncate": "rope_truncate",
              "attention_factor": "rope_attention_factor", "mscale": "rope_mscale",
              "mscale_all_dim": "rope_mscale_all_dim"}
_HF_ROPE_KEY = {ours: hf for hf, ours in _ROPE_KEYS.items()}
_ROPE_COMMON_KEYS = ("rope_type", "type", "rope_theta", "partial_rotary_factor")
_FLOATS = ("rms_norm_eps", "router_aux_loss_coef", "router_jitter_noise", "initializer_range", "clip_qkv",
           "rope_theta", "rope_factor", "rope_low_freq_factor", "rope_high_freq_factor", "rope_beta_fast",
           "rope_beta_slow", "rope_attention_factor", "rope_mscale", "rope_mscale_all_dim", "swiglu_limit",
           "swiglu_alpha")


def _model_type(d: dict, source: str) -> str:
    arch = d.get("architectures") or []
    mt = d.get("model_type")
    if mt is None:  # infer from the architecture (old Mixtral files may lack both: Mixtral)
        known = [m for m, a in ARCHITECTURES.items() if a in arch]
        mt = known[0] if known else "mixtral" if not arch else None
        if mt is None:
            raise ConfigError(f"{source}: no model_type and architectures={arch!r}; jsmaug reads model_type "
                              f"{sorted(ARCHITECTURES)}")
    if mt not in ARCHITECTURES:
        raise ConfigError(f"{source}: model_type {mt!r} (architectures={arch!r}) is not supported; jsmaug reads "
                          f"{', '.join(sorted(ARCHITECTURES))}")
    if arch and ARCHITECTURES[mt] not in arch:
        raise ConfigError(f"{source}: architectures={arch!r} do not match model_type {mt!r}, whose causal LM is "
                          f"{ARCHITECTURES[mt]}")
    foreign = sorted(k for k, owners in _OWNERS.items() if mt not in owners and d.get(k) not in (None, 0, False, []))
    if foreign:
        which = "; ".join(f"{k} ({'/'.join(_OWNERS[k])})" for k in foreign)
        raise ConfigError(f"{source}: model_type {mt!r} ({ARCHITECTURES[mt]}) but the file has fields of another "
                          f"family: {which}. A config.json holds one family's fields: fix model_type or drop them")
    return mt


def _rope(d: dict, mt: str, source: str) -> dict[str, Any]:
    """transformers' precedence: `rope_scaling` (older files) over `rope_parameters`; the dict's own rope_theta
    over the top-level one; llama3's original length defaults to max_position_embeddings."""
    params = d.get("rope_scaling") or d.get("rope_parameters") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"{source}: rope_scaling / rope_parameters must be a mapping, got {params!r}")
    if any(isinstance(v, dict) for v in params.values()):
        raise ConfigError(f"{source}: rope_parameters per layer type ({sorted(params)}) are not supported")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ConfigError(f"{source}: rope_type {rope_type!r} is not supported; jsmaug implements "
                          f"{', '.join(ROPE_TYPES)}")
    partial = params.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise ConfigError(f"{source}: partial_rotary_factor={partial!r} is not supported (jsmaug rotates all of "
                          "head_dim)")
    theta = params.get("rope_theta", (d.get("rope_parameters") or {}).get("rope_theta", d.get("rope_theta")))
    out: dict[str, Any] = {"rope_type": rope_type,
                           "rope_theta": _HF_DEFAULTS[mt]["rope_theta"] if theta is None else theta}
    required, optional = ROPE_FIELDS[rope_type]
    if rope_type == "yarn":  # HF's yarn keys, checked as its validator lists them: another key names itself
        known = set(_ROPE_COMMON_KEYS) | {_HF_ROPE_KEY[f] for f in required + optional}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ConfigError(f"{source}: rope_parameters key(s) {unknown} are not parameters of rope_type 'yarn' "
                              f"(jsmaug reads {', '.join(sorted(known))})")
    for field in required + optional:
        key = _HF_ROPE_KEY[field]
        value = params.get(key)
        if key == "original_max_position_embeddings" and value is None:
            value = d.get("original_max_position_embeddings", d.get("max_position_embeddings"))
        if value is None and field in required:
            raise ConfigError(f"{source}: rope_type {rope_type!r} needs {key} in rope_scaling / rope_parameters")
        if value is not None:
            out[field] = value
    return out


def _sliding_window(d: dict, mt: str, source: str) -> int | None:
    if mt in ("llama", "olmoe"):
        return None  # HF's attention for these ignores any sliding_window in the file
    window = d.get("sliding_window", _HF_DEFAULTS[mt].get("sliding_window"))
    if mt in ("mistral", "mixtral"):
        return window
    if not d.get("use_sliding_window", False):  # qwen: the window is off unless use_sliding_window
        return None
    if mt in ("qwen2", "qwen3"):  # HF: layers >= max_window_layers slide, the others do not
        n = d["num_hidden_layers"]
        types = d.get("layer_types") or ["sliding_attention" if i >= d.get("max_window_layers", 28)
                                         else "full_attention" for i in range(n)]
        if len(set(types)) > 1:
            full, sliding = types.count("full_attention"), types.count("sliding_attention")
            raise ConfigError(f"{source}: use_sliding_window with layers of both kinds ({full} full, {sliding} "
                              "sliding; max_window_layers / layer_types) is not supported: jsmaug applies one "
                              "window to every layer")
        return window if types[0] == "sliding_attention" else None
    return window


def _gemma3_layer_types(d: dict, source: str) -> tuple[str, ...]:
    n = d["num_hidden_layers"]
    types = d.get("layer_types")
    if types is None:  # the hub's older form: every pattern-th layer global
        pattern = d.get("sliding_window_pattern", d.get("_sliding_window_pattern", GEMMA3_SLIDING_WINDOW_PATTERN))
        if not isinstance(pattern, int) or pattern < 1:
            raise ConfigError(f"{source}: sliding_window_pattern must be a positive integer, got {pattern!r}")
        return layer_types_from_pattern(n, pattern)
    return _layer_types(d, source, n, ())


def _gemma3(d: dict, source: str) -> dict[str, Any]:
    """Gemma3TextConfig's layer types, window, scalar and per-layer-type RoPE (transformers 5's
    `convert_rope_params_to_dict`: `rope_parameters` per layer type, `rope_scaling` updating the global layers',
    top-level `rope_theta` / `rope_local_base_freq` where the dict has no theta)."""
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if d.get(key) is not None:
            raise ConfigError(f"{source}: {key}={d[key]!r} is not supported (jsmaug implements no logit "
                              "softcapping; Gemma 3's released configs have null)")
    if d.get("use_bidirectional_attention"):
        raise ConfigError(f"{source}: use_bidirectional_attention=true is not supported (jsmaug's attention is "
                          "causal)")
    defaults = _HF_DEFAULTS["gemma3_text"]
    params = d.get("rope_parameters") or {}
    if not isinstance(params, dict) or any(not isinstance(v, (dict, type(None))) for v in params.values()):
        raise ConfigError(f"{source}: gemma3_text's rope_parameters must map layer types to RoPE dicts "
                          f"({', '.join(LAYER_TYPES)}), got {params!r}")
    unknown = sorted(set(params) - set(LAYER_TYPES))
    if unknown:
        raise ConfigError(f"{source}: rope_parameters for layer type(s) {unknown} are not supported; jsmaug "
                          f"implements {', '.join(LAYER_TYPES)}")
    full = dict(params.get("full_attention") or {"rope_type": "default"})
    if d.get("rope_scaling"):
        full.update(d["rope_scaling"])
    full.setdefault("rope_theta", d.get("rope_theta", defaults["rope_theta"]))
    local = dict(params.get("sliding_attention") or {"rope_type": "default"})
    local.setdefault("rope_theta", d.get("rope_local_base_freq", defaults["rope_local_base_freq"]))
    local_type = local.get("rope_type", local.get("type", "default"))
    if local_type != "default" or local.get("partial_rotary_factor", 1.0) not in (None, 1, 1.0):
        raise ConfigError(f"{source}: rope_parameters.sliding_attention {local!r} is not supported; jsmaug's local "
                          "layers take rope_type default over all of head_dim")
    out = _rope({"rope_parameters": full, "max_position_embeddings": d.get("max_position_embeddings")},
                "gemma3_text", f"{source} (rope_parameters.full_attention)")
    window = d.get("sliding_window")
    return dict(out, layer_types=_gemma3_layer_types(d, source), rope_local_base_freq=float(local["rope_theta"]),
                head_dim=d.get("head_dim") or defaults["head_dim"],  # HF's default, not hidden / heads
                sliding_window=defaults["sliding_window"] if window is None else window,
                query_pre_attn_scalar=d.get("query_pre_attn_scalar") or defaults["query_pre_attn_scalar"])


def _layer_types(d: dict, source: str, n: int, default: tuple[str, ...]) -> tuple[str, ...]:
    types = d.get("layer_types")
    if types is None:
        return default
    if not isinstance(types, list) or len(types) != n:
        raise ConfigError(f"{source}: layer_types must list one type per layer ({n}), got {types!r}")
    unknown = sorted(set(types) - set(LAYER_TYPES))
    if unknown:
        raise ConfigError(f"{source}: layer_types value(s) {unknown} are not supported; jsmaug implements "
                          f"{', '.join(LAYER_TYPES)}")
    return tuple(types)


def _gpt_oss(d: dict, source: str) -> dict[str, Any]:
    """GptOssConfig's fields and defaults: alternating sliding / full layer types, the window, head_dim 64,
    attention biases on, yarn RoPE, the number of experts as `num_local_experts` or `num_experts` and of chosen
    ones as `num_experts_per_tok` or the hub's `experts_per_token`. A `quantization_config` may only be the hub's
    MXFP4 (the importer dequantizes it; jsmaug/hf/mxfp4.py)."""
    defaults = _HF_DEFAULTS["gpt_oss"]
    quant = d.get("quantization_config")
    if quant is not None and (not isinstance(quant, dict) or quant.get("quant_method") != "mxfp4"):
        method = quant.get("quant_method") if isinstance(quant, dict) else quant
        raise ConfigError(f"{source}: quantization_config with quant_method {method!r} is not supported; jsmaug "
                          "reads gpt_oss checkpoints in bf16/float32 or the hub's mxfp4 experts")
    n = d.get("num_hidden_layers", defaults["num_hidden_layers"])
    out: dict[str, Any] = {"num_hidden_layers": n, "layer_types": _layer_types(d, source, n, layer_types_from_pattern(
        n, GPT_OSS_SLIDING_WINDOW_PATTERN))}
    window = d.get("sliding_window", defaults["sliding_window"])
    if window is None and "sliding_attention" in out["layer_types"]:
        raise ConfigError(f"{source}: sliding_attention layers with sliding_window null are not supported")
    out["sliding_window"] = window
    out["bos_token_id"] = d.get("bos_token_id")  # GptOssConfig has none by default (the hub's file neither)
    for key in ("head_dim", "attention_bias"):
        out[key] = defaults[key] if d.get(key) is None else d[key]
    experts = d.get("num_local_experts", d.get("num_experts"))
    if experts is not None:
        out["num_local_experts"] = experts
    top_k = {k: d[k] for k in ("num_experts_per_tok", "experts_per_token") if d.get(k) is not None}
    if len(set(top_k.values())) > 1:
        raise ConfigError(f"{source}: num_experts_per_tok and experts_per_token disagree ({top_k})")
    if top_k:
        out["num_experts_per_tok"] = next(iter(top_k.values()))
    if not (d.get("rope_scaling") or d.get("rope_parameters")):
        d = dict(d, rope_parameters=dict(_GPT_OSS_ROPE, rope_theta=d.get("rope_theta", defaults["rope_theta"])))
    return dict(out, **_rope(d, "gpt_oss", source))


def from_hf_dict(d: dict[str, Any], source: str = "config.json", **overrides) -> ModelConfig:
    """A `ModelConfig` from an HF `config.json` dict of any supported family. `overrides` set jsmaug fields
    (dtypes, dispatch, LoRA) or replace HF ones."""
    mt = _model_type(d, source)
    if mt == "gemma3_text":  # Gemma3TextConfig's field; it has no hidden_act
        act_key, want = "hidden_activation", "gelu_pytorch_tanh"
    else:
        act_key, want = "hidden_act", "silu"
    act = d.get(act_key) or want
    if act != want:
        raise ConfigError(f"{source}: {act_key}={act!r} is not supported ({mt} uses {want})")
    if d.get("mlp_bias"):
        raise ConfigError(f"{source}: mlp_bias=true is not supported (no released {mt} checkpoint has MLP biases)")
    kw: dict[str, Any] = {"model_type": mt}
    for key in _COMMON + _FIELDS[mt]:
        if d.get(key) is not None:
            kw[key] = d[key]
    for key, value in _HF_DEFAULTS[mt].items():
        if key in ("rms_norm_eps", "max_position_embeddings"):
            kw.setdefault(key, value)
    if mt in ("qwen3_moe", "olmoe"):  # HF calls it num_experts (qwen3_moe's attribute_map writes either)
        experts = d.get("num_experts", d.get("num_local_experts"))
        if experts is not None:
            kw["num_local_experts"] = experts
    if mt == "olmoe" and "head_dim" in kw and kw["head_dim"] * kw.get("num_attention_heads", 1) == kw.get(
            "hidden_size"):
        del kw["head_dim"]
    if mt == "gemma3_text":
        kw.update(_gemma3(d, source))
    elif mt == "gpt_oss":
        kw.update(_gpt_oss(d, source))
    else:
        kw.update(_rope(d, mt, source))
        kw["sliding_window"] = _sliding_window(d, mt, source)
    if isinstance(kw.get("eos_token_id"), list):
        kw["eos_token_id"] = tuple(kw["eos_token_id"]) if len(kw["eos_token_id"]) > 1 else kw["eos_token_id"][0]
    if isinstance(kw.get("mlp_only_layers"), list):
        kw["mlp_only_layers"] = tuple(kw["mlp_only_layers"])
    for key in _FLOATS:
        if kw.get(key) is not None:
            kw[key] = float(kw[key])
    kw.update(overrides)
    try:
        return ModelConfig(**kw)
    except TypeError as err:
        raise ConfigError(f"{source}: {err}") from err
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from err


def to_hf_dict(config: ModelConfig, torch_dtype: str | None = None) -> dict[str, Any]:
    """The family's config.json: its own fields, the RoPE as `rope_theta` (+ `rope_scaling` when scaled) for the
    hub's readers and as `rope_parameters` for transformers 5."""
    c, mt = config, config.model_type
    d: dict[str, Any] = {"architectures": [ARCHITECTURES[mt]], "model_type": mt}
    for key in _COMMON + _FIELDS[mt]:
        value = getattr(c, key)
        d[key] = list(value) if isinstance(value, tuple) else value
    if c.head_dim is None or mt == "olmoe":  # as the import had it (OLMoE's config has none)
        del d["head_dim"]
    if mt in ("qwen3_moe", "olmoe"):
        d["num_experts"] = c.num_local_experts
    if mt in ("qwen2", "qwen3", "qwen3_moe"):
        d["use_sliding_window"] = c.sliding_window is not None
        d["sliding_window"] = c.sliding_window
        if mt != "qwen3_moe":
            d["max_window_layers"] = 0 if c.sliding_window is not None else c.num_hidden_layers
    if mt == "llama":
        d["mlp_bias"] = False
    if mt == "gemma3_text":
        return _gemma3_hf_dict(c, d, torch_dtype)
    if mt == "gpt_oss":  # the hub's file also names the top-k experts_per_token; no quantization_config (bf16)
        d.update(layer_types=list(c.layer_types), sliding_window=c.sliding_window,
                 experts_per_token=c.num_experts_per_tok)
    d["hidden_act"] = "silu"
    d["attention_dropout"] = 0.0
    d["use_cache"] = True
    scaling = {hf: getattr(c, ours) for hf, ours in _ROPE_KEYS.items() if getattr(c, ours) is not None}
    d["rope_theta"] = c.rope_theta
    if c.rope_type != "default":
        d["rope_scaling"] = {"rope_type": c.rope_type, **scaling}
    d["rope_parameters"] = {"rope_theta": c.rope_theta, "rope_type": c.rope_type, **scaling}
    d["torch_dtype"] = torch_dtype or c.param_dtype
    return d



def _gemma3_hf_dict(c: ModelConfig, d: dict[str, Any], torch_dtype: str | None) -> dict[str, Any]:
    """Gemma3TextConfig's fields: the RoPE per layer type (transformers 5) and as rope_theta /
    rope_local_base_freq / rope_scaling (older readers), with the same values."""
    scaling = {hf: getattr(c, ours) for hf, ours in _ROPE_KEYS.items() if getattr(c, ours) is not None}
    d.update(hidden_activation="gelu_pytorch_tanh", layer_types=list(c.layer_types), sliding_window=c.sliding_window,
             query_pre_attn_scalar=c.query_pre_attn_scalar, rope_theta=c.rope_theta,
             rope_local_base_freq=c.rope_local_base_freq, final_logit_softcapping=None, attn_logit_softcapping=None,
             use_bidirectional_attention=False, attention_dropout=0.0, use_cache=True)
    if c.rope_type != "default":
        d["rope_scaling"] = {"rope_type": c.rope_type, **scaling}
    d["rope_parameters"] = {
        "full_attention": {"rope_theta": c.rope_theta, "rope_type": c.rope_type, **scaling},
        "sliding_attention": {"rope_theta": c.rope_local_base_freq, "rope_type": "default"}}
    d["torch_dtype"] = torch_dtype or c.param_dtype
    return d
