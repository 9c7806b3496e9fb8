"""Text generation with a KV cache: greedy, or sampled with temperature / top-k / top-p.

Prompts of different lengths are LEFT-padded to a common length P (rounded up to a multiple of 16, so a few
prompt lengths share one compiled program), as HF `generate` does for decoder-only models: every row's last
prompt token then sits in slot P - 1 and new tokens are appended in the same slot for every row. Positions
count real tokens only (HF: cumsum(attention_mask) - 1), so a padded row computes exactly what it would alone.

Two kinds of jitted program: a prefill over the prompt (the first new token), then chunks of `chunk_length` decoding
steps (`lax.scan`, one token per step), the state and cache donated from chunk to chunk, so the tokens are those of
one uninterrupted run. Between chunks the host takes the new tokens: a row is finished at its `eos_id` (kept), at
`max_new_tokens`, or when the caller's `stop_check` says so (lm-eval's stop sequences); generation ends after the
chunk in which the last row finished. The cache has P + a whole number of chunks slots, so the programs depend on
(batch, P, chunks) only.

Sampling keys are per row (`row_keys`; `generate(keys=...)`): a row's token at position t is drawn with its key
folded with t, so its samples depend on its key and prompt, not on the call it shares, its batch position or the
padding; several problems' samples can share a call (`jsmaug pairs sample`). On a mesh (`mesh=`, `mesh_config=`)
the params are placed by the run's rule table and the rows split over the batch axes, in one process.

The decoding step of the seven HF families (LoRA and QLoRA included: below) is `_fast_step`, the decoder's
computation with S = 1 in the layout one token wants (`decode_weights`: per-layer weights, q/k/v and gate/up fused;
per-layer caches (B, K, T, Dh) written in place, attention with no transposes); any other config (Gemma, a config
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
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jsmaug.models import attention, decoder as model, lora, quant, rope
from jsmaug.models.config import ModelConfig, layer_groups
from jsmaug.models.mlp import SparseMoE, activation
from jsmaug.parallel import sharding as shd
from jsmaug.models.weights import rms_norm

CHUNK = 32  # decoding steps per jitted call (the host checks for finished rows between calls)


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0 = greedy (argmax)
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    eos_id: int | None = 2  # None = never stop early
    pad_id: int = 0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def _filter_logits(logits_BxV, sc: SamplingConfig):
    """Temperature, then top-k, then top-p (nucleus) filtering, as HF's logits warpers do it."""
    logits = logits_BxV / sc.temperature
    if sc.top_k:
        kth = jax.lax.top_k(logits, min(sc.top_k, logits.shape[-1]))[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sc.top_p < 1.0:
        sorted_desc = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_desc, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        keep = mass_before < sc.top_p
        cutoff = jnp.min(jnp.where(keep, sorted_desc, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return logits


def _next_token(logits_BxV, keys_B, pos_B, sc: SamplingConfig):
    """The token at position `pos_B` of each row: argmax, or a draw with the row's key folded with that position
    (so a row's draws depend on its own key, prompt length and logits only: not on the batch it shares)."""
    if sc.temperature == 0:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    step_keys_B = jax.vmap(jax.random.fold_in)(keys_B, pos_B)
    draw = jax.vmap(lambda key, logits_V: jax.random.categorical(key, logits_V))
    return draw(step_keys_B, _filter_logits(logits_BxV, sc)).astype(jnp.int32)


@jax.jit
def _fold_rows(key, ids_BxN):
    def one(ids_N):
        k = key
        for j in range(ids_BxN.shape[1]):
            k = jax.random.fold_in(k, ids_N[j])
        return k
    return jax.vmap(one)(ids_BxN)


def row_keys(seed: int, ids: Sequence[Sequence[int]] | Sequence[int]) -> jax.Array:
    """(B,) sampling keys: `jax.random.key(seed)` folded in turn with each row's ids, e.g. (problem, sample) or
    just the row number. A row sampled with the same key and prompt gets the same tokens whatever call it is in."""
    ids_BxN = np.asarray(ids, np.int64)
    if not ids_BxN.size or ids_BxN.ndim > 2 or ids_BxN.min() < 0 or ids_BxN.max() >= 2 ** 32:
        raise ValueError(f"row_keys: ids must be a non-empty (B,) or (B, N) array of uint32 values, got {ids!r}")
    return _fold_rows(jax.random.key(seed), ids_BxN.reshape(len(ids_BxN), -1).astype(np.uint32))


def _program_key(sc: SamplingConfig) -> SamplingConfig:
    """The static part of the sampling settings: max_new_tokens only sets how many chunks run, so it is left out
    of the compiled programs' keys."""
    return dataclasses.replace(sc, max_new_tokens=1)


# ---------------------------------------------------------------------------------------------- the decode step

FAST_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen3_moe", "olmoe")
# The config fields the fast step handles (or that cannot change one decoding step's result). A field added to
# ModelConfig later is unknown here: the fast step is used only while it keeps its default.
_KNOWN_FIELDS = frozenset((
    "model_type vocab_size hidden_size intermediate_size num_hidden_layers num_attention_heads num_key_value_heads "
    "head_dim attention_bias clip_qkv num_local_experts num_experts_per_tok moe_intermediate_size norm_topk_prob "
    "decoder_sparse_step mlp_only_layers rms_norm_eps rope_theta rope_type rope_factor rope_low_freq_factor "
    "rope_high_freq_factor rope_original_max_position_embeddings sliding_window max_position_embeddings "
    "router_aux_loss_coef router_jitter_noise output_router_logits tie_word_embeddings bos_token_id eos_token_id "
    "pad_token_id initializer_range param_dtype dtype remat moe_impl moe_block_size moe_capacity_factor moe_token_chunks "
    "moe_dispatch lora_rank lora_alpha lora_targets attention_impl attention_block_size rope_beta_fast rope_beta_slow "
    "rope_truncate rope_attention_factor rope_mscale rope_mscale_all_dim").split())
_NEEDS_DEFAULT = ("layer_types", "rope_local_base_freq", "query_pre_attn_scalar")


def fast_step_applies(config: ModelConfig) -> bool:
    """Whether `_fast_step` computes this config's decoding step (else the decoder's own `decode` does)."""
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


def _attend(config: ModelConfig, q_BxHxDh, k_BxKxTxDh, v_BxKxTxDh, mask_BxT):
    """One query per row over the cache, head-major (no transposes): float32 scores and softmax as
    attention.xla_attention computes them."""
    b, h, dh = q_BxHxDh.shape
    kv = k_BxKxTxDh.shape[1]
    q_BxKxGxDh = q_BxHxDh.reshape(b, kv, h // kv, dh)
    scores = jnp.einsum("bkgd,bktd->bkgt", q_BxKxGxDh, k_BxKxTxDh, preferred_element_type=jnp.float32)
    scores = jnp.where(mask_BxT[:, None, None, :], scores * (dh ** -0.5), attention.NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(q_BxHxDh.dtype)
    return jnp.einsum("bkgt,bktd->bkgd", probs, v_BxKxTxDh).reshape(b, h * dh)


def _fast_step(config: ModelConfig, w, token_B, pos_B, kv_valid_BxT, caches, slot):
    """One token per row through every layer (unrolled: per-layer weights and caches, no slicing of stacks), its
    keys and values written in place at cache slot `slot`; each layer's cache is ((B, K, T, Dh), (B, K, T, Dh)).
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
        # (B, 1, K, Dh) -> (B, K, 1, Dh): written into the carried cache in place (the chunk donates it)
        k_cache = jax.lax.dynamic_update_slice(k_cache, k.transpose(0, 2, 1, 3).astype(k_cache.dtype), (0, 0, slot, 0))
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


# ---------------------------------------------------------------------------------------------- prefill, chunks

@functools.partial(jax.jit, static_argnums=(0, 4, 5, 6))
def _prefill(config: ModelConfig, params, ids_BxP, mask_BxP, sc: SamplingConfig, total: int, fast: bool, keys_B):
    """The prompt through the model into a cache of `total` slots, and the first new token. Returns the decoding
    state (next token, its position, the valid slots, the cache, the rows' keys); with `fast`, the cache is per
    layer in `_fast_step`'s layout."""
    b, p = ids_BxP.shape
    kv_valid_BxT = jnp.concatenate([mask_BxP, jnp.zeros((b, total - p), jnp.int32)], axis=1)
    positions_BxP = jnp.maximum(jnp.cumsum(mask_BxP, axis=1) - 1, 0)
    logits, cache = model.decode(config, params, ids_BxP, positions_BxP, kv_valid_BxT,
                                 model.init_cache(config, b, total), 0)
    if fast:  # (L, B, T, K, Dh) -> per layer (B, K, T, Dh), once
        cache = tuple((k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)) for k, v in zip(*cache))
    pos_B = positions_BxP[:, -1] + 1
    return _next_token(logits[:, -1], keys_B, pos_B, sc), pos_B, kv_valid_BxT, cache, keys_B


@functools.partial(jax.jit, static_argnums=(0, 2, 3, 4), donate_argnums=(5,))
def _decode_chunk(config: ModelConfig, weights, sc: SamplingConfig, length: int, fast: bool, state, slot):
    """`length` decoding steps from the state (donated: the cache is updated in place across chunks). Step i
    writes the current token at cache slot `slot + i` and picks the next. `weights` are `decode_weights(...)`
    with `fast`, else the params. Returns the new state and the (length, B) tokens picked."""

    def step(carry, i):
        token, pos, kv_valid, cache, keys = carry
        kv_valid = jax.lax.dynamic_update_slice_in_dim(kv_valid, jnp.ones_like(kv_valid[:, :1]), slot + i, axis=1)
        if fast:
            logits, cache = _fast_step(config, weights, token, pos, kv_valid, cache, slot + i)
        else:
            logits, cache = model.decode(config, weights, token[:, None], pos[:, None], kv_valid, cache, slot + i)
            logits = logits[:, -1]
        token = _next_token(logits, keys, pos + 1, sc)
        return (token, pos + 1, kv_valid, cache, keys), token

    return jax.lax.scan(step, state, jnp.arange(length))


def left_pad(prompts: Sequence[Sequence[int]], multiple: int = 16, pad_id: int = 0):
    """(ids, mask) int32 arrays of shape (B, P): prompts right-aligned, P a multiple of `multiple`."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    p = -(-max(len(x) for x in prompts) // multiple) * multiple
    ids = np.full((len(prompts), p), pad_id, np.int32)
    mask = np.zeros((len(prompts), p), np.int32)
    for r, x in enumerate(prompts):
        ids[r, p - len(x):] = x
        mask[r, p - len(x):] = 1
    return ids, mask


def chunk_length(max_new_tokens: int) -> int:
    """Decoding steps per jitted call: CHUNK, or fewer for short generations (a multiple of 8, so only a few
    lengths ever compile)."""
    return min(CHUNK, -(-max_new_tokens // 8) * 8)


def _placed(config: ModelConfig, params, mesh, mesh_config, arrays):
    """The params on the mesh (`param_shardings`; a no-op when they are there already) and each (B, ...) array's
    rows split over the batch axes (B a multiple of `batch_rows_divisor`). One process only: the host loop reads
    every row's tokens, which a mesh spanning processes would not hold."""
    if any(d.process_index != jax.process_index() for d in mesh.devices.flat):
        raise ValueError("generate on a mesh spanning processes is not supported (docs/making-pairs.md says what "
                         "is missing); use a mesh of this process's devices")
    params = jax.device_put(params, shd.param_shardings(config, mesh, mesh_config))
    rows = shd.rows_sharding(mesh, mesh_config)
    return params, [jax.device_put(a, rows) for a in arrays]


def generate(config: ModelConfig, params, prompts: Sequence[Sequence[int]], sampling: SamplingConfig = SamplingConfig(),
             seed: int = 0, pad_multiple: int = 16,
             stop_check: Callable[[int, list[int]], bool] | None = None, fast: bool | None = None,
             keys: jax.Array | None = None, row_multiple: int = 1, mesh=None, mesh_config=None) -> list[list[int]]:
    """New token ids for every prompt (a list of token id lists, BOS included if wanted). A row is finished at
    its EOS token (kept), after `max_new_tokens`, or once `stop_check(row, new_ids_so_far)` returns True (called
    on the host after each new token of an unfinished row, EOS excepted; the token that made it True is kept).
    Decoding runs in chunks of `chunk_length` steps and ends after the chunk in which every row finished; the
    tokens are those of an uninterrupted run, cut where each row finished. `fast`: the decoding step (None: the
    fast one where `fast_step_applies`; False: `decoder.decode`, the reference).

    Sampling keys: `keys`, a (B,) key array (`row_keys`), one per row; by default `row_keys(seed, range(B))`.
    A row's token at position t is drawn with fold_in(its key, t), so its samples depend on its key and prompt
    only, not on the other rows, its place in the batch or the padding (up to floating-point rounding of its
    logits, which other batch shapes may change in the last bit; a draw changes only when that moves it across
    a boundary). `row_multiple`: the batch is padded with dummy rows to a multiple of it (fewer batch shapes to
    compile). `mesh` (a `jax.sharding.Mesh` with jsmaug's axes) and `mesh_config` (`sharding.MeshConfig`): the
    params are placed by the run's rule table and the rows split over its batch axes, in this process."""
    n = sampling.max_new_tokens
    b_real = len(prompts)
    if config.max_position_embeddings and max(len(x) for x in prompts) + n > config.max_position_embeddings:
        raise ValueError(f"prompt + max_new_tokens exceeds max_position_embeddings={config.max_position_embeddings}")
    if keys is None:
        keys = row_keys(seed, np.arange(b_real))
    if keys.shape != (b_real,):
        raise ValueError(f"keys: one key per prompt, shape ({b_real},), got {keys.shape}")
    multiple = row_multiple
    if mesh is not None:
        multiple = int(np.lcm(multiple, shd.batch_rows_divisor(mesh, mesh_config)))
    extra = -b_real % multiple
    ids, mask = left_pad(list(prompts) + [[sampling.pad_id]] * extra, pad_multiple, sampling.pad_id)
    if extra:
        keys = jnp.concatenate([keys, jnp.broadcast_to(keys[:1], (extra,))])
    b, p = ids.shape
    sc = _program_key(sampling)
    chunk = chunk_length(n)
    # The first token comes from the prefill; the other n - 1 from whole chunks (the cache holds them all).
    total = p + -(-(n - 1) // chunk) * chunk
    if fast and not fast_step_applies(config):
        raise ValueError(f"the fast decoding step does not compute model_type {config.model_type!r} with this config "
                         "(see fast_step_applies); use fast=None or False")
    fast = fast_step_applies(config) if fast is None else fast
    arrays = [jnp.asarray(ids), jnp.asarray(mask), keys]
    if mesh is not None:
        params, arrays = _placed(config, params, mesh, mesh_config, arrays)
    weights = decode_weights(config, params) if fast else params
    state = _prefill(config, params, arrays[0], arrays[1], sc, total, fast, arrays[2])
    rows: list[list[int]] = [[] for _ in range(b)]
    finished = [False] * b_real + [True] * extra

    def take(tokens_B):
        for r, token in enumerate(tokens_B):
            if finished[r]:
                continue
            rows[r].append(token)
            finished[r] = (len(rows[r]) >= n or (sampling.eos_id is not None and token == sampling.eos_id)
                           or (stop_check is not None and bool(stop_check(r, list(rows[r])))))

    take(np.asarray(state[0]).tolist())
    slot = p
    while not all(finished):
        state, tokens_CxB = _decode_chunk(config, weights, sc, chunk, fast, state, jnp.int32(slot))
        for tokens_B in np.asarray(tokens_CxB).tolist():
            take(tokens_B)
        slot += chunk
    return rows[:b_real]
