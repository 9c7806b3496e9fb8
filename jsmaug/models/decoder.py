"""The Mixtral sparse-MoE decoder in Flax linen, matching HF `MixtralForCausalLM`.

Why linen: `nn.scan` + `nn.remat` give one compiled layer for all 32 with a single flag, and
`nn.with_logical_partitioning` attaches logical axis names to every weight, which the sharding rules map to a
mesh (MaxText's approach). The public API is functional (`init_params`, `forward`): params are a plain
pytree of arrays, so losses, optimizers, converters and checkpoints never see a Module.

Array names carry their shapes: B batch, S sequence (queries), T keys, D hidden, H query heads,
K kv heads, G query heads per kv head, Dh head dim, V vocab, E experts, L layers.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jsmaug.models import attention, lora, moe

from jsmaug.parallel import expert_parallel
from jsmaug.models.config import MixtralConfig

Params = Any


def _dtype(name: str):
    return jnp.dtype(name)


def _param(module: nn.Module, name: str, shape, axes, init, config: MixtralConfig):
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, _dtype(config.param_dtype))


def _normal(config: MixtralConfig):
    return nn.initializers.normal(stddev=config.initializer_range)


def _weight(module: nn.Module, name: str, shape, axes, config: MixtralConfig):
    """A weight in the compute dtype; with LoRA on it, W + alpha / rank * A @ B (jsmaug/models/lora.py)."""
    dtype = _dtype(config.dtype)
    w = _param(module, name, shape, axes, _normal(config), config).astype(dtype)
    if not config.lora_rank or name not in config.lora_targets:
        return w
    a_shape, a_axes, b_shape, b_axes = lora.factor_shapes(name, shape, axes, config.lora_rank)
    a = _param(module, name + "_lora_a", a_shape, a_axes, lora.a_init(name), config)
    b = _param(module, name + "_lora_b", b_shape, b_axes, nn.initializers.zeros, config)
    scale = config.lora_alpha / config.lora_rank
    return w + (scale * lora.delta(name, a.astype(jnp.float32), b.astype(jnp.float32))).astype(dtype)


class RMSNorm(nn.Module):
    config: MixtralConfig

    @nn.compact
    def __call__(self, x_BxSxD):
        weight_D = _param(self, "weight", (x_BxSxD.shape[-1],), ("embed",), nn.initializers.ones, self.config)
        # Computed in float32 and cast back before the weight, as HF does.
        xf = x_BxSxD.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.config.rms_norm_eps)
        return y.astype(x_BxSxD.dtype) * weight_D.astype(x_BxSxD.dtype)


def rope_cos_sin(positions_BxS, head_dim: int, theta: float):
    """rotate_half RoPE tables in float32: (B, S, head_dim) each."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs_BxSxHalf = positions_BxS.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs_BxSxHalf, freqs_BxSxHalf], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x_BxSxHxDh, cos_BxSxDh, sin_BxSxDh):
    half = x_BxSxHxDh.shape[-1] // 2
    x1, x2 = x_BxSxHxDh[..., :half], x_BxSxHxDh[..., half:]
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    cos, sin = cos_BxSxDh[:, :, None, :], sin_BxSxDh[:, :, None, :]
    return (x_BxSxHxDh.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin).astype(x_BxSxHxDh.dtype)


class Attention(nn.Module):
    config: MixtralConfig

    @nn.compact
    def __call__(self, x_BxSxD, cos, sin, mask, cache=None, cache_index=None):
        """Without a cache, `mask` is the (B, S) segment ids and `config.attention_impl` picks the kernel
        (jsmaug/models/attention.py). With `cache` = (k, v) of shape (B, T, K, Dh), the new keys and values are written
        at slots cache_index .. cache_index + S, the queries attend over all T slots, and `mask` is the
        (B, S, T) boolean mask saying which. Returns (output, updated cache or None)."""
        c = self.config
        dtype = _dtype(c.dtype)
        d, h, kv, dh = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.resolved_head_dim
        wq = _weight(self, "q_proj", (d, h, dh), ("embed", "heads", "head_dim"), c)
        wk = _weight(self, "k_proj", (d, kv, dh), ("embed", "kv_heads", "head_dim"), c)
        wv = _weight(self, "v_proj", (d, kv, dh), ("embed", "kv_heads", "head_dim"), c)
        wo = _weight(self, "o_proj", (h, dh, d), ("heads", "head_dim", "embed"), c)
        x = x_BxSxD.astype(dtype)
        q_BxSxHxDh = apply_rope(jnp.einsum("bsd,dhk->bshk", x, wq.astype(dtype)), cos, sin)
        k_BxSxKxDh = apply_rope(jnp.einsum("bsd,dhk->bshk", x, wk.astype(dtype)), cos, sin)
        v_BxSxKxDh = jnp.einsum("bsd,dhk->bshk", x, wv.astype(dtype))
        if cache is not None:
            start = (0, cache_index, 0, 0)
            k_BxSxKxDh = jax.lax.dynamic_update_slice(cache[0], k_BxSxKxDh.astype(cache[0].dtype), start)
            v_BxSxKxDh = jax.lax.dynamic_update_slice(cache[1], v_BxSxKxDh.astype(cache[1].dtype), start)
            cache = (k_BxSxKxDh, v_BxSxKxDh)
            out_BxSxHxDh = attention.xla_attention(q_BxSxHxDh, k_BxSxKxDh, v_BxSxKxDh, mask)
        else:
            out_BxSxHxDh = attention.self_attention(
                q_BxSxHxDh, k_BxSxKxDh, v_BxSxKxDh, mask, sliding_window=c.sliding_window,
                implementation=c.attention_impl, block_size=c.attention_block_size, dtype=c.dtype)
        out = jnp.einsum("bshk,hkd->bsd", out_BxSxHxDh, wo.astype(dtype))
        return out, cache


class SparseMoE(nn.Module):
    config: MixtralConfig

    @nn.compact
    def __call__(self, x_BxSxD, token_mask_BxS):
        c = self.config
        dtype = _dtype(c.dtype)
        d, f, e = c.hidden_size, c.intermediate_size, c.num_local_experts
        gate = _param(self, "gate", (d, e), ("embed", "exp"), _normal(c), c)
        w1 = _weight(self, "w1", (e, d, f), ("exp", "embed", "mlp"), c)
        w3 = _weight(self, "w3", (e, d, f), ("exp", "embed", "mlp"), c)
        w2 = _weight(self, "w2", (e, f, d), ("exp", "mlp", "embed"), c)
        b, s, _ = x_BxSxD.shape
        x_TxD = x_BxSxD.reshape(b * s, d).astype(dtype)
        # Router in float32 (its softmax decides which experts run: keep it exact).
        logits_TxE = x_TxD.astype(jnp.float32) @ gate.astype(jnp.float32)
        probs_TxE, idx_TxK, w_TxK = moe.route(logits_TxE, c.num_experts_per_tok)
        # The experts in the compute dtype before any dispatch: a gathered (or all_to_all-side) copy of bf16
        # weights is half the bytes of the float32 master weights.
        y_TxD, dropped = expert_parallel.expert_ffn(
            x_TxD, idx_TxK, w_TxK.astype(dtype), w1.astype(dtype), w3.astype(dtype), w2.astype(dtype),
            dispatch=c.moe_dispatch, impl=c.moe_impl, block_size=c.moe_block_size,
            capacity_factor=c.moe_capacity_factor)
        # Load-balancing statistics over unpadded tokens (HF's load_balancing_loss_func with an attention mask).
        valid_T = token_mask_BxS.reshape(-1).astype(jnp.float32)
        counts_E = jnp.sum(jax.nn.one_hot(idx_TxK, e, dtype=jnp.float32) * valid_T[:, None, None], axis=(0, 1))
        prob_sums_E = jnp.sum(probs_TxE * valid_T[:, None], axis=0)
        stats = {"counts": counts_E, "prob_sums": prob_sums_E, "dropped": dropped}
        return y_TxD.reshape(b, s, d), stats


class DecoderLayer(nn.Module):
    config: MixtralConfig

    @nn.compact
    def __call__(self, x_BxSxD, cos, sin, mask_BxSxT, token_mask_BxS, cache_index=None, cache=None):
        h, cache = Attention(self.config, name="self_attn")(
            RMSNorm(self.config, name="input_layernorm")(x_BxSxD), cos, sin, mask_BxSxT, cache, cache_index)
        x_BxSxD = x_BxSxD + h.astype(x_BxSxD.dtype)
        y, stats = SparseMoE(self.config, name="block_sparse_moe")(
            RMSNorm(self.config, name="post_attention_layernorm")(x_BxSxD), token_mask_BxS)
        return x_BxSxD + y.astype(x_BxSxD.dtype), (stats, cache)


class _ScanBody(nn.Module):
    """DecoderLayer with the (carry, xs) -> (carry, ys) signature nn.scan wants. `cache` (this layer's slice
    of the stacked KV cache, or None) is scanned over; everything else is broadcast."""
    config: MixtralConfig

    @nn.compact
    def __call__(self, x, cos, sin, mask, token_mask, cache_index, cache):
        layer_cls = DecoderLayer
        if self.config.remat != "none":
            policy = (jax.checkpoint_policies.dots_with_no_batch_dims_saveable
                      if self.config.remat == "minimal" else None)
            layer_cls = nn.remat(DecoderLayer, policy=policy, prevent_cse=False)
        return layer_cls(self.config, name="layer")(x, cos, sin, mask, token_mask, cache_index, cache)


class Mixtral(nn.Module):
    config: MixtralConfig

    def setup(self):
        c = self.config
        self.embed_tokens = self.param(
            "embed_tokens", nn.with_logical_partitioning(_normal(c), ("vocab", "embed")),
            (c.vocab_size, c.hidden_size), _dtype(c.param_dtype))
        self.layers = nn.scan(
                _ScanBody, variable_axes={"params": 0}, split_rngs={"params": True},
                in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, 0),
                length=c.num_hidden_layers, metadata_params={nn.PARTITION_NAME: "layers"},
        )(c, name="layers")
        self.norm = RMSNorm(c, name="norm")
        if not c.tie_word_embeddings:
            self.lm_head = self.param(
                "lm_head", nn.with_logical_partitioning(_normal(c), ("embed", "vocab")),
                (c.hidden_size, c.vocab_size), _dtype(c.param_dtype))

    def _embed(self, input_ids_BxS, positions_BxS):
        """Token embeddings in the compute dtype and the RoPE tables for their positions."""
        c = self.config
        x = jnp.take(self.embed_tokens, input_ids_BxS, axis=0).astype(_dtype(c.dtype))
        return (x, *rope_cos_sin(positions_BxS, c.resolved_head_dim, c.rope_theta))

    def hidden(self, input_ids_BxS, segment_ids_BxS, positions_BxS):
        """Final normed hidden states (B, S, D) and the stacked per-layer MoE statistics."""
        x, cos, sin = self._embed(input_ids_BxS, positions_BxS)
        token_mask = segment_ids_BxS > 0
        # One compiled layer for all of them; stats come back stacked over layers. The attention kernel gets
        # the segment ids, not an (S, S) mask: memory-efficient kernels never build one.
        x, (stats, _) = self.layers(x, cos, sin, segment_ids_BxS, token_mask, None, None)
        return self.norm(x), stats

    def decode(self, input_ids_BxS, positions_BxS, kv_valid_BxT, cache, cache_index):
        """S new tokens at cache slots cache_index .. cache_index + S - 1 (prefill: S = prompt length;
        decoding: S = 1). kv_valid_BxT marks the slots that hold real tokens, these included.
        cache = (k, v), each (L, B, T, K, Dh). Returns float32 logits (B, S, V) and the updated cache."""
        c = self.config
        b, s = input_ids_BxS.shape
        t = kv_valid_BxT.shape[1]
        x, cos, sin = self._embed(input_ids_BxS, positions_BxS)
        q_valid_BxS = jax.lax.dynamic_slice_in_dim(kv_valid_BxT, cache_index, s, axis=1)
        # Slot order is time order, and real tokens sit in consecutive slots, so slot distance is position
        # distance: the causal and sliding-window tests can use slot indices.
        mask = attention.mask_BxSxT(q_valid_BxS, c.sliding_window, kv_segment_ids_BxT=kv_valid_BxT,
                                    q_index_BxS=cache_index + jnp.arange(s)[None, :],
                                    kv_index_BxT=jnp.arange(t)[None, :])
        x, (_, cache) = self.layers(x, cos, sin, mask, q_valid_BxS > 0, cache_index, cache)
        return self.unembed(self.norm(x)), cache

    def unembed(self, h_BxSxD):
        dtype = _dtype(self.config.dtype)
        w = self.embed_tokens.T if self.config.tie_word_embeddings else self.lm_head
        return jnp.einsum("bsd,dv->bsv", h_BxSxD.astype(dtype), w.astype(dtype),
                          preferred_element_type=jnp.float32)

    def __call__(self, input_ids_BxS, segment_ids_BxS, positions_BxS):
        h, stats = self.hidden(input_ids_BxS, segment_ids_BxS, positions_BxS)
        return self.unembed(h), stats


# ---------------------------------------------------------------------------------------------- functional API

@functools.lru_cache(maxsize=None)
def _module(config: MixtralConfig) -> Mixtral:
    return Mixtral(config)


def _dummy_inputs():
    ids = jnp.zeros((1, 1), jnp.int32)
    return ids, jnp.ones((1, 1), jnp.int32), jnp.zeros((1, 1), jnp.int32)


def init_params(config: MixtralConfig, rng: jax.Array) -> Params:
    """Random parameters (a plain pytree of arrays, dtype `config.param_dtype`)."""
    boxed = _module(config).init(rng, *_dummy_inputs())["params"]
    return nn.meta.unbox(boxed)


def param_shapes(config: MixtralConfig) -> Params:
    """ShapeDtypeStructs of the params, without allocating anything."""
    return jax.eval_shape(lambda: init_params(config, jax.random.key(0)))


def logical_axes(config: MixtralConfig) -> Params:
    """A pytree like the params whose leaves are PartitionSpecs of *logical* axis names."""
    boxed = jax.eval_shape(lambda: _module(config).init(jax.random.key(0), *_dummy_inputs())["params"])
    return nn.get_partition_spec(boxed)


def _inputs(input_ids, attention_mask, segment_ids, positions):
    b, s = input_ids.shape
    if segment_ids is None:
        segment_ids = (jnp.ones((b, s), jnp.int32) if attention_mask is None
                       else jnp.asarray(attention_mask).astype(jnp.int32))
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    return jnp.asarray(input_ids, jnp.int32), jnp.asarray(segment_ids, jnp.int32), jnp.asarray(positions, jnp.int32)


def aux_loss_from_stats(config: MixtralConfig, stats, segment_ids_BxS) -> jax.Array:
    """HF's load-balancing loss (unscaled) from the per-layer statistics the layers return."""
    num_rows = config.num_hidden_layers * jnp.sum((segment_ids_BxS > 0).astype(jnp.float32))
    return moe.load_balancing_loss(jnp.sum(stats["counts"], 0), jnp.sum(stats["prob_sums"], 0), num_rows,
                                   config.num_local_experts)


def forward_hidden(config: MixtralConfig, params: Params, input_ids, attention_mask=None, *, segment_ids=None,
                   positions=None):
    """Final hidden states (B, S, D) before the lm_head, the aux loss and the MoE statistics."""
    ids, seg, pos = _inputs(input_ids, attention_mask, segment_ids, positions)
    h, stats = _module(config).apply({"params": params}, ids, seg, pos, method=Mixtral.hidden)
    return h, aux_loss_from_stats(config, stats, seg), stats


def unembed(config: MixtralConfig, params: Params, h_BxSxD):
    """Float32 logits from hidden states (exposed so losses can chunk over the sequence)."""
    return _module(config).apply({"params": params}, h_BxSxD, method=Mixtral.unembed)


def forward(config: MixtralConfig, params: Params, input_ids, attention_mask=None, *, segment_ids=None,
            positions=None, return_stats: bool = False):
    """Logits (B, S, V) in float32 and HF's load-balancing aux loss (unscaled, padding excluded).

    attention_mask: (B, S) 1 for tokens, 0 for padding. segment_ids (packed sequences, 0 = padding) takes
    its place when given. positions default to 0..S-1 in every row (HF's default).
    """
    h, aux, stats = forward_hidden(config, params, input_ids, attention_mask, segment_ids=segment_ids,
                                   positions=positions)
    logits = unembed(config, params, h)
    return (logits, aux, stats) if return_stats else (logits, aux)


def init_cache(config: MixtralConfig, batch: int, length: int):
    """An empty KV cache (k, v), each (layers, batch, length, kv_heads, head_dim) in the compute dtype."""
    shape = (config.num_hidden_layers, batch, length, config.num_key_value_heads, config.resolved_head_dim)
    return jnp.zeros(shape, _dtype(config.dtype)), jnp.zeros(shape, _dtype(config.dtype))


def decode(config: MixtralConfig, params: Params, input_ids_BxS, positions_BxS, kv_valid_BxT, cache, cache_index):
    """Incremental forward with a KV cache (see `Mixtral.decode`): (logits (B, S, V) float32, new cache)."""
    return _module(config).apply({"params": params}, jnp.asarray(input_ids_BxS, jnp.int32),
                                 jnp.asarray(positions_BxS, jnp.int32), jnp.asarray(kv_valid_BxT, jnp.int32),
                                 cache, cache_index, method=Mixtral.decode)
