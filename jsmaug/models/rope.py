"""Rotary position embeddings in the `rotate_half` form, with the RoPE variants of released checkpoints.

`inv_freq_i = 1 / theta**(2i / d)` in float32 (HF's default), then per `rope_type`:
- "linear" (position interpolation): `inv_freq / factor`;
- "llama3" (Llama 3.1): wavelengths `2 pi / inv_freq` above `original_max_position_embeddings / low_freq_factor`
  are divided by `factor`, those below `... / high_freq_factor` kept, and the band between interpolated with
  `s = (orig / wavelen - low) / (high - low)`: `(1 - s) * inv_freq / factor + s * inv_freq`.
Both keep HF's attention scaling of 1. Gemma 3's local (sliding-window) layers use the default RoPE with their
own base, `rope_local_base_freq` (`cos_sin(..., sliding=True)`); its global layers use the rope_* fields.
transformers' `_compute_linear_scaling_rope_parameters` and `_compute_llama3_parameters` (modeling_rope_utils.py)
are the reference; tests/test_families.py compares logits.
"""

from __future__ import annotations

import math

import jax.numpy as jnp

from jsmaug.models.config import ModelConfig


def local_rope(config: ModelConfig) -> bool:
    """Whether sliding-window layers have a RoPE of their own (Gemma 3's rope_local_base_freq)."""
    return config.rope_local_base_freq is not None


def inv_frequencies(config: ModelConfig, sliding: bool = False):
    """(head_dim // 2,) float32 inverse frequencies of the config's RoPE (of its local layers' if `sliding`)."""
    d = config.resolved_head_dim
    exponents = jnp.arange(0, d, 2, dtype=jnp.float32) / d
    if sliding and local_rope(config):
        return 1.0 / (config.rope_local_base_freq ** exponents)
    inv_freq = 1.0 / (config.rope_theta ** exponents)
    if config.rope_type == "linear":
        return inv_freq / config.rope_factor
    if config.rope_type == "llama3":
        factor, low, high = config.rope_factor, config.rope_low_freq_factor, config.rope_high_freq_factor
        orig = config.rope_original_max_position_embeddings
        wavelen = 2 * math.pi / inv_freq
        scaled = jnp.where(wavelen > orig / low, inv_freq / factor, inv_freq)
        smooth = (orig / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < orig / high) & ~(wavelen > orig / low)
        return jnp.where(medium, smoothed, scaled)
    return inv_freq


def cos_sin(positions_BxS, config: ModelConfig, sliding: bool = False):
    """rotate_half RoPE tables in float32: (B, S, head_dim) each (of the local layers' RoPE if `sliding`)."""
    freqs_BxSxHalf = positions_BxS.astype(jnp.float32)[..., None] * inv_frequencies(config, sliding)
    emb = jnp.concatenate([freqs_BxSxHalf, freqs_BxSxHalf], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x_BxSxHxDh, cos_BxSxDh, sin_BxSxDh):
    half = x_BxSxHxDh.shape[-1] // 2
    x1, x2 = x_BxSxHxDh[..., :half], x_BxSxHxDh[..., half:]
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    cos, sin = cos_BxSxDh[:, :, None, :], sin_BxSxDh[:, :, None, :]
    return (x_BxSxHxDh.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin).astype(x_BxSxHxDh.dtype)
