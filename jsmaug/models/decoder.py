"""One decoder for nine HF families (Llama, Mistral, Qwen2, Qwen3, Gemma 3, Mixtral, Qwen3-MoE, OLMoE, gpt-oss), in
Flax linen.

Every family is the same pre-norm stack, `h = x + Attn(RMSNorm(x))`, `out = h + MLP(RMSNorm(h))`, with switches
read from the config (jsmaug/models/config.py): q/k/v(/o) biases, q/k RMSNorm per head or over the whole
projection, q/k/v clipping, the RoPE variant (jsmaug/models/rope.py), a sliding window, tied embeddings, and per
layer a dense SwiGLU MLP or the sparse MoE block (jsmaug/models/mlp.py). Gemma 3 (`config.is_gemma`) adds
"sandwich" norms, `h = x + RMSNorm(Attn(RMSNorm(x)))`, `out = h + RMSNorm(MLP(RMSNorm(h)))`, with (1 + w) norm
weights, GeGLU, the embedding times sqrt(hidden_size), attention scaled by query_pre_attn_scalar ** -0.5, and
local (sliding-window, own RoPE base) and global layers in one stack. gpt-oss (`config.attention_sinks`) adds
one learned logit per query head to each softmax's denominator (`self_attn/sinks`, every attention path of
jsmaug/models/attention.py), q/k/v/o biases, sliding-window and full layers sharing one (yarn) RoPE, and its
experts' extras (router and expert biases, the clamped SwiGLU) in the MoE block. The tests hold each family's
logits to transformers' on the same weights (tests/test_families*.py, test_gemma3.py, test_gpt_oss.py).

A layer is a linen module (jsmaug/models/layer.py; `nn.with_logical_partitioning` names every weight's axes for the
sharding rules); the stack is plain JAX: the layers of one kind are stacked on a leading `layers` axis
(`params["layers"]["layer"]` when all layers are of one kind, else `dense_layer` and `sparse_layer`) and each run of
consecutive layers of one kind is one `lax.scan` over a slice of its stack, so a model compiles one layer per kind
and run. Local and global attention layers (Gemma 3) do not split a run: each layer gets a scanned flag `sliding`
and picks its RoPE table and mask with it, and its attention kernel with a `lax.cond` between the windowed and the
full one (both static, so every kernel keeps its block skipping). The public API is functional (`init_params`,
`forward`, `decode`): params are a plain pytree of arrays, so losses, optimizers, converters and checkpoints never
see a Module.

Array names carry their shapes: B batch, S sequence (queries), T keys, D hidden, H query heads,
K kv heads, Dh head dim, V vocab, E experts, L layers.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jsmaug.models import attention, moe, quant, rope
from jsmaug.models.config import ModelConfig, layer_groups, layer_segments
from jsmaug.models.layer import DecoderLayer
from jsmaug.models.weights import RMSNorm, normal, rms_norm

Params = Any


# ---------------------------------------------------------------------------------------------- the stack

def _layer_fn(config: ModelConfig, sparse: bool):
    """One layer as a function of its params, rematerialised per `config.remat`."""
    layer = DecoderLayer(config, sparse)

    def apply(p, x, cos, sin, mask, token_mask, cache_index, cache, sliding):
        return layer.apply({"params": p}, x, cos, sin, mask, token_mask, cache_index, cache, sliding)

    if config.remat == "none":
        return apply
    policy = jax.checkpoint_policies.dots_with_no_batch_dims_saveable if config.remat == "minimal" else None
    return jax.checkpoint(apply, policy=policy, prevent_cse=False)


def _empty_stats():
    return {"counts": jnp.zeros((0, 1), jnp.float32), "prob_sums": jnp.zeros((0, 1), jnp.float32),
            "dropped": jnp.zeros((0,), jnp.int32)}


def _concat(parts):
    return parts[0] if len(parts) == 1 else jax.tree.map(lambda *a: jnp.concatenate(a), *parts)


def run_layers(config: ModelConfig, layers: Params, x, cos, sin, mask, token_mask, cache_index=None, cache=None):
    """All layers in HF order: per run of one kind, a `lax.scan` over its slice of the kind's stack (and of the
    (L, ...) KV cache). A stack of local and global layers scans each layer's `sliding` flag with its params.
    Returns (x, MoE statistics stacked over the sparse layers, updated cache or None)."""
    stats, caches = [], []
    for group, sparse, start, stop, first in layer_segments(config):
        p = layers[group]
        if (start, stop) != (0, jax.tree.leaves(p)[0].shape[0]):
            p = jax.tree.map(lambda a, i=start, j=stop: a[i:j], p)
        c = None
        if cache is not None:
            c = cache if stop - start == config.num_hidden_layers else jax.tree.map(
                lambda a, i=first, j=first + stop - start: a[i:j], cache)
        fn = _layer_fn(config, sparse)
        flags = (jnp.asarray(config.layer_sliding[first:first + stop - start]) if config.mixed_attention
                 else None)

        def body(h, xs, fn=fn):
            h, (st, c_new) = fn(xs[0], h, cos, sin, mask, token_mask, cache_index, xs[1], xs[2])
            return h, (st, c_new)

        x, (st, c_new) = jax.lax.scan(body, x, (p, c, flags), unroll=min(config.scan_unroll, stop - start))
        if sparse:
            stats.append(st)
        caches.append(c_new)
    return x, (_concat(stats) if stats else _empty_stats()), (None if cache is None else _concat(caches))


# ---------------------------------------------------------------------------------------------- functional API

def _dummy_layer_inputs(config: ModelConfig):
    dh = config.resolved_head_dim
    table = jnp.zeros((1, 1, dh), jnp.float32)
    return (jnp.zeros((1, 1, config.hidden_size), jnp.dtype(config.dtype)), table, table,
            jnp.ones((1, 1), jnp.int32), jnp.ones((1, 1), bool))


def _scan(module_cls, config: ModelConfig, sparse: bool, length: int, name: str):
    """`length` stacked layers (a key each, leading axis named `layers`), as nn.scan initialises them."""
    return nn.scan(module_cls, variable_axes={"params": 0}, split_rngs={"params": True},
                   in_axes=(nn.broadcast,) * 5 + (0,), length=length,
                   metadata_params={nn.PARTITION_NAME: "layers"})(config, sparse, name=name)


class _ScanBody(nn.Module):
    config: ModelConfig
    sparse: bool

    @nn.compact
    def __call__(self, x, cos, sin, mask, token_mask, cache_index, cache):
        return DecoderLayer(self.config, self.sparse, name="layer")(x, cos, sin, mask, token_mask, cache_index, cache)


class _Stacks(nn.Module):
    """A model of both kinds of layers: one stack per kind (`dense_layer`, `sparse_layer`)."""
    config: ModelConfig

    @nn.compact
    def __call__(self, x, *args):
        for group, sparse, idx in layer_groups(self.config):
            x, _ = _scan(DecoderLayer, self.config, sparse, len(idx), group)(x, *args)
        return x, None


class _Params(nn.Module):
    """Declares the params (names, logical axes, random init): used by `init_params` and `logical_axes` only, the
    forward is `run_layers` (so it never meets stored params, nor a quantized `embed_tokens` / `lm_head`: those
    are read by `embed_rows` and `unembed_weight`; their shardings are fitted to the quantized leaves by
    `quant.fit_sharding`). A model of one kind of layer gets exactly the tree (and, key for key, the random
    init) of jsmaug's Mixtral before the families."""
    config: ModelConfig

    def setup(self):
        c = self.config
        dtype = jnp.dtype(c.param_dtype)
        self.embed_tokens = self.param("embed_tokens", nn.with_logical_partitioning(normal(c), ("vocab", "embed")),
                                       (c.vocab_size, c.hidden_size), dtype)
        groups = layer_groups(c)
        self.layers = (_scan(_ScanBody, c, groups[0][1], c.num_hidden_layers, "layers") if len(groups) == 1
                       else _Stacks(c, name="layers"))
        self.norm = RMSNorm(c, name="norm")
        if not c.tie_word_embeddings:
            self.lm_head = self.param("lm_head", nn.with_logical_partitioning(normal(c), ("embed", "vocab")),
                                      (c.hidden_size, c.vocab_size), dtype)

    def __call__(self, x, cos, sin, segment_ids, token_mask):
        x = jnp.take(self.embed_tokens, jnp.zeros(x.shape[:2], jnp.int32), axis=0)
        x, _ = self.layers(x, cos, sin, segment_ids, token_mask, None, None)
        h = self.norm(x)
        return h @ (self.embed_tokens.T if self.config.tie_word_embeddings else self.lm_head)


def _boxed_init(config: ModelConfig, rng: jax.Array):
    """The params as flax boxes that carry each leaf's logical axis names."""
    return _Params(config).init(rng, *_dummy_layer_inputs(config))["params"]


@functools.partial(jax.jit, static_argnums=0)
def init_params(config: ModelConfig, rng: jax.Array) -> Params:
    """Random parameters (a plain pytree of arrays, dtype `config.param_dtype`). Jitted (the config static):
    flax's init runs the layers on a dummy input, which op by op took 2.4-4.7 s for the 2-layer test model on the
    2-core CPU; compiled (1.5 s, and once per config), XLA drops that work. The values are op by op's
    up to float32 rounding (the embedding tables' scaling is fused; at most 7.5e-9 apart in the tiny model)."""
    return nn.meta.unbox(_boxed_init(config, rng))


def param_shapes(config: ModelConfig) -> Params:
    """ShapeDtypeStructs of the params, without allocating anything."""
    return jax.eval_shape(lambda: init_params(config, jax.random.key(0)))


def logical_axes(config: ModelConfig) -> Params:
    """A pytree like the params whose leaves are PartitionSpecs of *logical* axis names."""
    return nn.get_partition_spec(jax.eval_shape(lambda: _boxed_init(config, jax.random.key(0))))


def _rope_tables(config: ModelConfig, positions_BxS):
    """(cos, sin) for the layers: one table each when all layers share a RoPE (gpt-oss's local and global layers
    do), else pairs (global, local)."""
    if not (config.mixed_attention and rope.local_rope(config)):
        return rope.cos_sin(positions_BxS, config, sliding=config.layer_sliding[0])
    (cos_g, sin_g), (cos_l, sin_l) = (rope.cos_sin(positions_BxS, config, sliding=s) for s in (False, True))
    return (cos_g, cos_l), (sin_g, sin_l)


def embed_rows(config: ModelConfig, params_or_embed, ids):
    """The embedding rows of `ids` (any shape; rows (*ids.shape, D)), from the params or their `embed_tokens`
    leaf. A plain table: `jnp.take`, in the table's dtype. A quantized one (QLoRA, `lora.quantize_base`, grouped
    along D): only the gathered packed rows and their scales are dequantized, into the compute dtype
    (`quant.take_rows`); the (V, D) table is never dequantized for a look-up. No Gemma scaling (see `_embed`)."""
    embed = params_or_embed["embed_tokens"] if isinstance(params_or_embed, dict) else params_or_embed
    if quant.is_quantized(embed):
        return quant.take_rows(embed, ids, jnp.dtype(config.dtype))
    return jnp.take(embed, ids, axis=0)


def _embed(config: ModelConfig, params: Params, input_ids_BxS, positions_BxS):
    """Token embeddings in the compute dtype and the RoPE tables for their positions."""
    x = embed_rows(config, params, input_ids_BxS)
    if config.is_gemma:  # times sqrt(hidden_size) rounded to the embedding's dtype first, as HF does
        x = x * jnp.asarray(np.float32(math.sqrt(config.hidden_size)), x.dtype)
    return (x.astype(jnp.dtype(config.dtype)), *_rope_tables(config, positions_BxS))


def final_norm(config: ModelConfig, params: Params, x_BxSxD):
    """The norm before the unembedding."""
    return rms_norm(x_BxSxD, params["norm"]["weight"], config.rms_norm_eps, offset=config.norm_offset,
                    weight_in_float32=config.norm_weight_in_float32)


def _inputs(input_ids, attention_mask, segment_ids, positions):
    b, s = input_ids.shape
    if segment_ids is None:
        segment_ids = (jnp.ones((b, s), jnp.int32) if attention_mask is None
                       else jnp.asarray(attention_mask).astype(jnp.int32))
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    return jnp.asarray(input_ids, jnp.int32), jnp.asarray(segment_ids, jnp.int32), jnp.asarray(positions, jnp.int32)


def aux_loss_from_stats(config: ModelConfig, stats, segment_ids_BxS) -> jax.Array:
    """HF's load-balancing loss (unscaled) over the sparse layers' statistics; 0 for a dense model."""
    if not config.is_moe:
        return jnp.zeros((), jnp.float32)
    num_rows = stats["counts"].shape[0] * jnp.sum((segment_ids_BxS > 0).astype(jnp.float32))
    return moe.load_balancing_loss(jnp.sum(stats["counts"], 0), jnp.sum(stats["prob_sums"], 0), num_rows,
                                   config.num_local_experts)


def forward_hidden(config: ModelConfig, params: Params, input_ids, attention_mask=None, *, segment_ids=None,
                   positions=None):
    """Final hidden states (B, S, D) before the lm_head, the aux loss and the MoE statistics."""
    ids, seg, pos = _inputs(input_ids, attention_mask, segment_ids, positions)
    x, cos, sin = _embed(config, params, ids, pos)
    # The attention kernel gets the segment ids, not an (S, S) mask: memory-efficient kernels never build one.
    x, stats, _ = run_layers(config, params["layers"], x, cos, sin, seg, seg > 0)
    h = final_norm(config, params, x)
    return h, aux_loss_from_stats(config, stats, seg), stats


def unembed_weight(config: ModelConfig, params: Params):
    """The (D, V) unembedding matrix in the compute dtype. A tied model uses the embedding matrix: one leaf, so
    its gradient is the sum of both uses. A quantized table (QLoRA) is dequantized here into the compute dtype,
    whole: the log-prob kernel (jsmaug/models/logps.py) chunks the sequence, not the vocabulary, so every chunk
    needs all of it, as the float32 step's kernel has all of its float32 table."""
    w, table_vd = unembed_operand(config, params)
    return w.T if table_vd else w


def unembed_operand(config: ModelConfig, params: Params):
    """(matrix, is_vd) for the log-prob kernel: a tied model's (V, D) embedding table as it is stored (is_vd
    True: the kernel contracts it as it is, with no transposed copy of the table each step), else the (D, V)
    `lm_head`; in the compute dtype, a quantized one (QLoRA) dequantized whole."""
    dtype = jnp.dtype(config.dtype)
    w = params["embed_tokens"] if config.tie_word_embeddings else params["lm_head"]
    return (w.dequantize(dtype) if quant.is_quantized(w) else w).astype(dtype), config.tie_word_embeddings


def unembed(config: ModelConfig, params: Params, h_BxSxD):
    """Float32 logits from hidden states (exposed so losses can chunk over the sequence)."""
    w = unembed_weight(config, params)
    return jnp.einsum("bsd,dv->bsv", h_BxSxD.astype(w.dtype), w, preferred_element_type=jnp.float32)


def forward(config: ModelConfig, params: Params, input_ids, attention_mask=None, *, segment_ids=None,
            positions=None, return_stats: bool = False):
    """Logits (B, S, V) in float32 and HF's load-balancing aux loss (unscaled, padding excluded; 0 if dense).

    attention_mask: (B, S) 1 for tokens, 0 for padding. segment_ids (packed sequences, 0 = padding) takes
    its place when given. positions default to 0..S-1 in every row (HF's default).
    """
    h, aux, stats = forward_hidden(config, params, input_ids, attention_mask, segment_ids=segment_ids,
                                   positions=positions)
    logits = unembed(config, params, h)
    return (logits, aux, stats) if return_stats else (logits, aux)


def init_cache(config: ModelConfig, batch: int, length: int):
    """An empty KV cache (k, v), each (layers, batch, length, kv_heads, head_dim) in the compute dtype."""
    shape = (config.num_hidden_layers, batch, length, config.num_key_value_heads, config.resolved_head_dim)
    return jnp.zeros(shape, jnp.dtype(config.dtype)), jnp.zeros(shape, jnp.dtype(config.dtype))


def decode(config: ModelConfig, params: Params, input_ids_BxS, positions_BxS, kv_valid_BxT, cache, cache_index):
    """S new tokens at cache slots cache_index .. cache_index + S - 1 (prefill: S = prompt length;
    decoding: S = 1). kv_valid_BxT marks the slots that hold real tokens, these included.
    cache = (k, v), each (L, B, T, K, Dh). Returns float32 logits (B, S, V) and the updated cache."""
    ids = jnp.asarray(input_ids_BxS, jnp.int32)
    kv_valid_BxT = jnp.asarray(kv_valid_BxT, jnp.int32)
    s, t = ids.shape[1], kv_valid_BxT.shape[1]
    x, cos, sin = _embed(config, params, ids, jnp.asarray(positions_BxS, jnp.int32))
    q_valid_BxS = jax.lax.dynamic_slice_in_dim(kv_valid_BxT, cache_index, s, axis=1)
    # Slot order is time order, and real tokens sit in consecutive slots, so slot distance is position
    # distance: the causal and sliding-window tests can use slot indices.
    def mask_for(window):
        return attention.mask_BxSxT(q_valid_BxS, window, kv_segment_ids_BxT=kv_valid_BxT,
                                    q_index_BxS=cache_index + jnp.arange(s)[None, :],
                                    kv_index_BxT=jnp.arange(t)[None, :])

    # A stack of local and global layers gets both masks (global, local); each layer takes its own.
    mask = ((mask_for(None), mask_for(config.sliding_window)) if config.mixed_attention
            else mask_for(config.attention_window))
    x, _, cache = run_layers(config, params["layers"], x, cos, sin, mask, q_valid_BxS > 0, cache_index, cache)
    h = final_norm(config, params, x)
    return unembed(config, params, h), cache
