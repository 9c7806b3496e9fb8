"""The fast decoding step of `jsmaug.models.generate`: one token per row through every layer, in the layout one
token wants, for the seven HF families (`fast_step_applies`; anything else decodes with `decoder.decode`).

The decoding step of the seven HF families (LoRA and QLoRA included: below) is `fast_step`, the decoder's
computation with S = 1 in the layout one token wants (`decode_weights`: per-layer weights, q/k/v and gate/up fused;
per-layer caches written in place, keys (B, K, Dh, T) and values (B, K, T, Dh), so both attention products read
their cache in the layout the dot wants); any other config (Gemma, a config
field added since) decodes with `decoder.decode`. tests/test_generate.py holds both to HF `generate` and to each
other; docs/performance.md has their speed.

LoRA and QLoRA (a base from `lora.quantize_base`, packed NF4 / int4 / int8 leaves) in the fast step: the decode
weights are the layer's EFFECTIVE weights, formed once per `generate` call, per layer, as the decoder's
`weights.weight` forms them inside every forward: a quantized projection dequantized into the compute dtype,
plus alpha / rank * A @ B (float32, cast) where it has adapters; the step then needs no adapters and no
dequantization (its MoE layer runs without LoRA on the merged experts). Why once and not inside the step: a step
that dequantizes reads the packed base but repeats the dequantization (and A @ B) every token for every layer;
the decode weights are already a second copy of the model for the fused matrices, and `jsmaug evaluate` / `pairs
sample` / `iterate` load a LoRA workdir merged into its dequantized base (`checkpoint.load_params`) anyway. Cost:
while `generate` runs, the projections exist dequantized in the compute dtype beside the packed base (in bfloat16
3.8x an NF4 base's bytes at group 64, 16 against 4.25 bits a weight: Mixtral-8x7B 86.8 GiB beside 23.1 GiB, by
`jax.eval_shape`); `fast=False` keeps the base packed (`decoder.decode` dequantizes one layer at a time in every
step, 1.87x the fast step's time in docs/training.md's measurement). The embedding table stays packed
(`decoder.embed_rows` dequantizes the looked-up rows); a quantized unembedding (tied table or lm_head) is
dequantized once into a (D, V) matrix in the compute dtype instead of in every step. The prefill runs
`decoder.decode` on the params as given (packed base, adapters applied in the layer). tests/test_generate_qlora.py
holds both steps of a QLoRA policy to the same model with its base dequantized to float.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jsmaug.models import attention, decoder as model, lora, quant, rope
from jsmaug.models.config import ModelConfig, layer_groups
from jsmaug.models.mlp import SparseMoE, activation
from jsmaug.models.weights import rms_norm

FAST_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen3_moe", "olmoe")
# The config fields the fast step handles (or that cannot change one decoding step's result). A field added to
# ModelConfig later is unknown here: the fast step is used only while it keeps its default.
_KNOWN_FIELDS = frozenset((
    "model_type vocab_size hidden_size intermediate_size num_hidden_layers num_attention_heads num_key_value_heads "
    "head_dim attention_bias clip_qkv num_local_experts num_experts_per_tok moe_intermediate_size norm_topk_prob "
    "decoder_sparse_step mlp_only_layers rms_norm_eps rope_theta rope_type rope_factor rope_low_freq_factor "
    "rope_high_freq_factor rope_original_max_position_embeddings sliding_window max_position_embeddings "
    "router_aux_loss_coef router_jitter_noise output_router_logits tie_word_embeddings bos_token_id eos_token_id "
    "pad_token_id initializer_range param_dtype dtype remat scan_unroll moe_impl moe_block_size moe_capacity_factor moe_token_chunks "
    "moe_dispatch lora_rank lora_alpha lora_targets attention_impl attention_block_size shared_prompt_masks "
    "rope_beta_fast rope_beta_slow "
    "rope_truncate rope_attention_factor rope_mscale rope_mscale_all_dim").split())
_NEEDS_DEFAULT = ("layer_types", "rope_local_base_freq", "query_pre_attn_scalar")


def fast_step_applies(config: ModelConfig) -> bool:
    """Whether `fast_step` computes this config's decoding step (else the decoder's own `decode` does)."""
    if config.model_type not in FAST_FAMILIES:
        return False
    for f in dataclasses.fields(config):
        if f.name in _NEEDS_DEFAULT or f.name not in _KNOWN_FIELDS:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            if getattr(config, f.name) != default:
                return False
    return True


def _effective(config: ModelConfig, tree, dtype):
    """One layer's params (a nested dict) with every weight as the layer computes with it (`weights.weight`): a
    quantized leaf dequantized into `dtype`, and with LoRA on, W + alpha / rank * A @ B (the product in float32,
    cast to `dtype`, added in `dtype`); the adapter leaves dropped. Other leaves are returned as they are."""
    scale = config.lora_alpha / config.lora_rank if config.lora_rank else 0.0
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out[k] = _effective(config, v, dtype)
            continue
        if k.endswith(("_lora_a", "_lora_b")):
            continue
        w = v.dequantize(dtype) if quant.is_quantized(v) else v
        if config.lora_rank and k + "_lora_a" in tree:
            d = lora.delta(k, tree[k + "_lora_a"].astype(jnp.float32), tree[k + "_lora_b"].astype(jnp.float32))
            w = w.astype(dtype) + (scale * d).astype(dtype)
        out[k] = w
    return out


@functools.partial(jax.jit, static_argnums=0)
def decode_weights(config: ModelConfig, params):
    """The weights in the layout one decoding step wants: a tuple of per-layer dicts in HF order (no per-step
    slicing of the (L, ...) stacks), q/k/v fused into one (D, (H + 2K) Dh) matrix and gate/up into one (D, 2F).
    Each is the layer's effective weight (`_effective`: a quantized base dequantized, LoRA adapters added), so
    the step sees a model without adapters; a quantized unembedding is dequantized once, into `unembed_DxV`."""
    d, h, kv, dh = (config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
                    config.resolved_head_dim)
    dtype = jnp.dtype(config.dtype)
    where = {n: (group, j) for group, _, idx in layer_groups(config) for j, n in enumerate(idx)}
    layers = []
    for n, sparse in enumerate(config.sparse_layers):
        group, j = where[n]
        # a[j] slices a quantized leaf's packed values and scales; its static shape is already one layer's
        p = _effective(config, jax.tree.map(lambda a, j=j: a[j], params["layers"][group]), dtype)
        a = p["self_attn"]
        w = {"ln1": p["input_layernorm"]["weight"], "ln2": p["post_attention_layernorm"]["weight"],
             "wqkv": jnp.concatenate([a["q_proj"].reshape(d, h * dh), a["k_proj"].reshape(d, kv * dh),
                                      a["v_proj"].reshape(d, kv * dh)], axis=1).astype(dtype),
             "wo": a["o_proj"].reshape(h * dh, d).astype(dtype)}
        if config.qkv_bias:
            w["bqkv"] = jnp.concatenate([a["q_proj_bias"].reshape(-1), a["k_proj_bias"].reshape(-1),
                                         a["v_proj_bias"].reshape(-1)]).astype(dtype)
        if config.o_bias:
            w["bo"] = a["o_proj_bias"].astype(dtype)
        if config.qk_norm != "none":
            w["q_norm"], w["k_norm"] = a["q_norm"]["weight"], a["k_norm"]["weight"]
        if sparse:
            w["moe"] = p["block_sparse_moe"]
        else:
            m = p["mlp"]
            w["w_gate_up"] = jnp.concatenate([m["gate_proj"], m["up_proj"]], axis=1).astype(dtype)
            w["w_down"] = m["down_proj"].astype(dtype)
        layers.append(w)
    head = {k: params[k] for k in ("embed_tokens", "lm_head") if k in params}
    if quant.is_quantized(params["embed_tokens" if config.tie_word_embeddings else "lm_head"]):
        head["unembed_DxV"] = model.unembed_weight(config, params)  # the compute dtype, as every step would form it
        head.pop("lm_head", None)
    return {"layers": tuple(layers), "norm": params["norm"]["weight"], **head}


def _logits(config: ModelConfig, w, hidden_BxSxD):
    """`decoder.unembed` from the decode weights: their dequantized `unembed_DxV` when there is one."""
    if "unembed_DxV" in w:
        return model.unembed(config.replace(tie_word_embeddings=False), {"lm_head": w["unembed_DxV"]}, hidden_BxSxD)
    return model.unembed(config, w, hidden_BxSxD)


def _attend(config: ModelConfig, q_BxHxDh, k_BxKxDhxT, v_BxKxTxDh, mask_BxT):
    """One query per row over the cache, head-major (no transposes): float32 scores and softmax as
    attention.xla_attention computes them. The keys are stored (Dh, T), so the scores are q @ K with K in the
    layout the dot reads: with (T, Dh) keys the scores took 18.7 ms of a 102 ms SmolLM2 step at 32 rows and 144
    slots, the probabilities x values (the same bytes, already in (T, Dh)) 4.0 (tools/profile_decode.py,
    docs/performance.md)."""
    b, h, dh = q_BxHxDh.shape
    kv = k_BxKxDhxT.shape[1]
    q_BxKxGxDh = q_BxHxDh.reshape(b, kv, h // kv, dh)
    scores = jnp.einsum("bkgd,bkdt->bkgt", q_BxKxGxDh, k_BxKxDhxT, preferred_element_type=jnp.float32)
    scores = jnp.where(mask_BxT[:, None, None, :], scores * (dh ** -0.5), attention.NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(q_BxHxDh.dtype)
    return jnp.einsum("bkgt,bktd->bkgd", probs, v_BxKxTxDh).reshape(b, h * dh)


def fast_step(config: ModelConfig, w, token_B, pos_B, kv_valid_BxT, caches, slot):
    """One token per row through every layer (unrolled: per-layer weights and caches, no slicing of stacks), its
    keys and values written in place at cache slot `slot`; each layer's cache is ((B, K, Dh, T), (B, K, T, Dh)).
    The same computation as decoder.decode with S = 1. Returns float32 logits (B, V) and the caches."""
    c = config
    dtype = jnp.dtype(c.dtype)
    h, kv, dh = c.num_attention_heads, c.num_key_value_heads, c.resolved_head_dim
    b = token_B.shape[0]
    x_BxD = model.embed_rows(c, w["embed_tokens"], token_B).astype(dtype)  # a QLoRA base's packed rows too
    cos, sin = rope.cos_sin(pos_B[:, None], c)
    mask_BxT = kv_valid_BxT > 0
    if c.sliding_window is not None:
        mask_BxT &= (slot - jnp.arange(kv_valid_BxT.shape[1]))[None, :] < c.sliding_window
    out_caches = []
    for layer, (k_cache, v_cache) in zip(w["layers"], caches):
        qkv = rms_norm(x_BxD, layer["ln1"], c.rms_norm_eps) @ layer["wqkv"]
        if "bqkv" in layer:
            qkv = qkv + layer["bqkv"]
        q = qkv[:, :h * dh].reshape(b, 1, h, dh)
        k = qkv[:, h * dh:(h + kv) * dh].reshape(b, 1, kv, dh)
        v = qkv[:, (h + kv) * dh:].reshape(b, 1, kv, dh)
        if c.qk_norm == "head":
            q, k = rms_norm(q, layer["q_norm"], c.rms_norm_eps), rms_norm(k, layer["k_norm"], c.rms_norm_eps)
        elif c.qk_norm == "projection":
            q, k = rms_norm(q, layer["q_norm"], c.rms_norm_eps, 2), rms_norm(k, layer["k_norm"], c.rms_norm_eps, 2)
        if c.clip_qkv is not None:
            q, k, v = (jnp.clip(t, -c.clip_qkv, c.clip_qkv) for t in (q, k, v))
        q, k = rope.apply_rope(q, cos, sin), rope.apply_rope(k, cos, sin)
        # (B, 1, K, Dh) -> keys (B, K, Dh, 1), values (B, K, 1, Dh): written into the carried cache in place (the
        # chunk donates it)
        k_cache = jax.lax.dynamic_update_slice(k_cache, k.transpose(0, 2, 3, 1).astype(k_cache.dtype), (0, 0, 0, slot))
        v_cache = jax.lax.dynamic_update_slice(v_cache, v.transpose(0, 2, 1, 3).astype(v_cache.dtype), (0, 0, slot, 0))
        out_caches.append((k_cache, v_cache))
        o = _attend(c, q.reshape(b, h, dh), k_cache, v_cache, mask_BxT) @ layer["wo"]
        if "bo" in layer:
            o = o + layer["bo"]
        x_BxD = x_BxD + o.astype(x_BxD.dtype)
        y = rms_norm(x_BxD, layer["ln2"], c.rms_norm_eps)
        if "moe" in layer:
            # the experts are merged already (decode_weights): the layer runs them without adapters
            y, _ = SparseMoE(c.replace(lora_rank=0)).apply({"params": layer["moe"]}, y[:, None], jnp.ones((b, 1), bool))
            y = y[:, 0]
        else:
            gate_up = y @ layer["w_gate_up"]
            f = gate_up.shape[-1] // 2
            y = (activation(c.hidden_act)(gate_up[:, :f]) * gate_up[:, f:]) @ layer["w_down"]
        x_BxD = x_BxD + y.astype(x_BxD.dtype)
    hidden = rms_norm(x_BxD, w["norm"], c.rms_norm_eps)
    return _logits(c, w, hidden[:, None])[:, 0], tuple(out_caches)
