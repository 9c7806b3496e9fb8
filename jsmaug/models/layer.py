"""One decoder layer of every family, in Flax linen: `Attention` (q/k/v/o projections with the family's biases,
q/k norms, clipping, RoPE, sinks and query scaling, then a kernel of jsmaug/models/attention.py, or a KV cache when
decoding) and `DecoderLayer` (the pre-norm residual block around it and the dense MLP or the MoE block, with
Gemma 3's sandwich norms). The stack of layers, the params and the functional API are jsmaug/models/decoder.py's.

Array names carry their shapes: B batch, S sequence (queries), T keys, D hidden, H query heads, K kv heads,
Dh head dim.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jsmaug.models import attention, rope
from jsmaug.models.config import ModelConfig
from jsmaug.models.mlp import DenseMLP, SparseMoE
from jsmaug.models.weights import RMSNorm, bias, normal, param, weight


class Attention(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x_BxSxD, cos, sin, mask, cache=None, cache_index=None, sliding=None):
        """Without a cache, `mask` is the (B, S) segment ids and `config.attention_impl` picks the kernel
        (jsmaug/models/attention.py). With `cache` = (k, v) of shape (B, T, K, Dh), the new keys and values are written
        at slots cache_index .. cache_index + S, the queries attend over all T slots, and `mask` is the
        (B, S, T) boolean mask saying which. `sliding` (a traced bool, for a stack of local and global layers)
        picks the windowed kernel or the full one; None: every layer alike (`config.attention_window`).
        Returns (output, updated cache or None)."""
        c = self.config
        dtype = jnp.dtype(c.dtype)
        d, h, kv, dh = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.resolved_head_dim
        wq = weight(self, "q_proj", (d, h, dh), ("embed", "heads", "head_dim"), c)
        wk = weight(self, "k_proj", (d, kv, dh), ("embed", "kv_heads", "head_dim"), c)
        wv = weight(self, "v_proj", (d, kv, dh), ("embed", "kv_heads", "head_dim"), c)
        wo = weight(self, "o_proj", (h, dh, d), ("heads", "head_dim", "embed"), c)
        x = x_BxSxD.astype(dtype)
        q_BxSxHxDh = jnp.einsum("bsd,dhk->bshk", x, wq)
        k_BxSxKxDh = jnp.einsum("bsd,dhk->bshk", x, wk)
        v_BxSxKxDh = jnp.einsum("bsd,dhk->bshk", x, wv)
        if c.qkv_bias:
            q_BxSxHxDh = q_BxSxHxDh + bias(self, "q_proj_bias", (h, dh), ("heads", "head_dim"), c)
            k_BxSxKxDh = k_BxSxKxDh + bias(self, "k_proj_bias", (kv, dh), ("kv_heads", "head_dim"), c)
            v_BxSxKxDh = v_BxSxKxDh + bias(self, "v_proj_bias", (kv, dh), ("kv_heads", "head_dim"), c)
        if c.qk_norm == "head":  # Qwen3: one RMSNorm over head_dim, shared by the heads
            q_BxSxHxDh = RMSNorm(c, (dh,), ("head_dim",), name="q_norm")(q_BxSxHxDh)
            k_BxSxKxDh = RMSNorm(c, (dh,), ("head_dim",), name="k_norm")(k_BxSxKxDh)
        elif c.qk_norm == "projection":  # OLMoE: over the whole projection (all heads together)
            q_BxSxHxDh = RMSNorm(c, (h, dh), ("heads", "head_dim"), name="q_norm")(q_BxSxHxDh)
            k_BxSxKxDh = RMSNorm(c, (kv, dh), ("kv_heads", "head_dim"), name="k_norm")(k_BxSxKxDh)
        if c.clip_qkv is not None:
            q_BxSxHxDh, k_BxSxKxDh, v_BxSxKxDh = (jnp.clip(t, -c.clip_qkv, c.clip_qkv)
                                                  for t in (q_BxSxHxDh, k_BxSxKxDh, v_BxSxKxDh))
        q_BxSxHxDh = rope.apply_rope(q_BxSxHxDh, cos, sin)
        k_BxSxKxDh = rope.apply_rope(k_BxSxKxDh, cos, sin)
        # gpt-oss's attention sinks: one learned logit per query head in each row's softmax denominator.
        sinks_H = (param(self, "sinks", (h,), ("heads",), normal(c), c).astype(jnp.float32) if c.attention_sinks
                   else None)
        if c.is_gemma and c.query_pre_attn_scalar != dh:
            # Every kernel scales scores by head_dim ** -0.5; Gemma by query_pre_attn_scalar ** -0.5.
            factor = (c.query_pre_attn_scalar / dh) ** -0.5
            q_BxSxHxDh = (q_BxSxHxDh.astype(jnp.float32) * factor).astype(q_BxSxHxDh.dtype)
        if cache is not None:
            start = (0, cache_index, 0, 0)
            k_BxSxKxDh = jax.lax.dynamic_update_slice(cache[0], k_BxSxKxDh.astype(cache[0].dtype), start)
            v_BxSxKxDh = jax.lax.dynamic_update_slice(cache[1], v_BxSxKxDh.astype(cache[1].dtype), start)
            cache = (k_BxSxKxDh, v_BxSxKxDh)
            out_BxSxHxDh = attention.xla_attention(q_BxSxHxDh, k_BxSxKxDh, v_BxSxKxDh, mask, sinks_H)
        else:
            def attend(window):
                return lambda q, k, v: attention.self_attention(
                    q, k, v, mask, sliding_window=window, implementation=c.attention_impl,
                    block_size=c.attention_block_size, dtype=c.dtype, sinks_H=sinks_H, shared=c.shared_prompt_masks)

            qkv = (q_BxSxHxDh, k_BxSxKxDh, v_BxSxKxDh)
            if sliding is None:
                out_BxSxHxDh = attend(c.attention_window)(*qkv)
            else:  # one branch runs per layer; each keeps its static window (and its kernel's block skipping)
                out_BxSxHxDh = jax.lax.cond(sliding, attend(c.sliding_window), attend(None), *qkv)
        out = jnp.einsum("bshk,hkd->bsd", out_BxSxHxDh, wo)
        if c.o_bias:
            out = out + bias(self, "o_proj_bias", (d,), ("embed",), c)
        return out, cache


class DecoderLayer(nn.Module):
    """One pre-norm layer; `sparse` picks the MoE block (`block_sparse_moe`) over the dense MLP (`mlp`)."""
    config: ModelConfig
    sparse: bool

    @nn.compact
    def __call__(self, x_BxSxD, cos, sin, mask_BxSxT, token_mask_BxS, cache_index=None, cache=None, sliding=None):
        """With `sliding` (a stack of local and global layers), a decoding mask and (Gemma 3) cos and sin come as
        pairs (global, local) and the layer takes its own."""
        c = self.config
        if sliding is not None and isinstance(cos, tuple):  # Gemma 3: local layers have a RoPE of their own
            cos, sin = (jnp.where(sliding, t[1], t[0]) for t in (cos, sin))
        if sliding is not None and isinstance(mask_BxSxT, tuple):
            mask_BxSxT = jnp.where(sliding, mask_BxSxT[1], mask_BxSxT[0])
        h, cache = Attention(c, name="self_attn")(
            RMSNorm(c, name="input_layernorm")(x_BxSxD), cos, sin, mask_BxSxT, cache, cache_index, sliding)
        if c.is_gemma:  # Gemma normalises the attention's output before the residual add
            h = RMSNorm(c, name="post_attention_layernorm")(h)
        x_BxSxD = x_BxSxD + h.astype(x_BxSxD.dtype)
        y = RMSNorm(c, name="pre_feedforward_layernorm" if c.is_gemma else "post_attention_layernorm")(x_BxSxD)
        if self.sparse:
            y, stats = SparseMoE(c, name="block_sparse_moe")(y, token_mask_BxS)
        else:
            y, stats = DenseMLP(c, name="mlp")(y), {}
        if c.is_gemma:
            y = RMSNorm(c, name="post_feedforward_layernorm")(y)
        return x_BxSxD + y.astype(x_BxSxD.dtype), (stats, cache)
