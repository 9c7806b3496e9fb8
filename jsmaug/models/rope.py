"""Rotary position embeddings in the `rotate_half` form, with the RoPE variants of released checkpoints.

`inv_freq_i = 1 / theta**(2i / d)` in float32 (HF's default), then per `rope_type`:
- "linear" (position interpolation): `inv_freq / factor`;
- "llama3" (Llama 3.1): wavelengths `2 pi / inv_freq` above `original_max_position_embeddings / low_freq_factor`
  are divided by `factor`, those below `... / high_freq_factor` kept, and the band between interpolated with
  `s = (orig / wavelen - low) / (high - low)`: `(1 - s) * inv_freq / factor + s * inv_freq`.
- "yarn" (YaRN; gpt-oss, Qwen3's long context): per dimension pair a blend of `inv_freq` (extrapolation) and
  `inv_freq / factor` (interpolation), interpolated below dimension `low` and extrapolated above `high`, linear
  between; `low` / `high` are where a wavelength fits `original_max_position_embeddings / (beta * 2 pi)` times
  (beta_fast, beta_slow), rounded outward when `truncate` (HF's default). cos and sin are multiplied by the
  attention factor (`attention_factor`, else `0.1 ln(factor) + 1`, or with `mscale` and `mscale_all_dim` the ratio
  of the two such terms), so the attention scores grow by its square, as HF's rotary embedding does.
linear and llama3 keep HF's attention scaling of 1. Gemma 3's local (sliding-window) layers use the default RoPE with their
own base, `rope_local_base_freq` (`cos_sin(..., sliding=True)`); its global layers use the rope_* fields.
transformers' `_compute_linear_scaling_rope_parameters`, `_compute_llama3_parameters` and
`_compute_yarn_parameters` (modeling_rope_utils.py) are the reference; tests/test_families.py and
tests/test_rope_yarn.py compare inverse frequencies, scaling and logits.
"""

from __future__ import annotations

import math

import jax.numpy as jnp

from jsmaug.models.config import ModelConfig


def local_rope(config: ModelConfig) -> bool:
    """Whether sliding-window layers have a RoPE of their own (Gemma 3's rope_local_base_freq)."""
    return config.rope_local_base_freq is not None


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def attention_scaling(config: ModelConfig, sliding: bool = False) -> float:
    """The factor cos and sin are multiplied by: yarn's attention factor, else 1 (and 1 for Gemma's local RoPE)."""
    if config.rope_type != "yarn" or (sliding and local_rope(config)):
        return 1.0
    if config.rope_attention_factor is not None:
        return float(config.rope_attention_factor)
    if config.rope_mscale and config.rope_mscale_all_dim:
        return _yarn_mscale(config.rope_factor, config.rope_mscale) / _yarn_mscale(config.rope_factor,
                                                                                    config.rope_mscale_all_dim)
    return _yarn_mscale(config.rope_factor)


def _yarn(config: ModelConfig, pos_freqs, d: int):
    """YaRN's blend of extrapolated and interpolated frequencies (float32, as HF computes it)."""
    factor, base = config.rope_factor, config.rope_theta
    orig = config.rope_original_max_position_embeddings
    beta_fast, beta_slow = config.rope_beta_fast or 32.0, config.rope_beta_slow or 1.0

    def correction_dim(rotations):  # the dimension whose wavelength fits `rotations` times in orig positions
        return d * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if config.rope_truncate is not False:  # HF's default is True
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001  # HF: avoids a zero-width ramp
    ramp = jnp.clip((jnp.arange(d // 2, dtype=jnp.float32) - low) / (high - low), 0.0, 1.0)
    extrapolation = 1.0 - ramp
    return (1.0 / (factor * pos_freqs)) * (1.0 - extrapolation) + (1.0 / pos_freqs) * extrapolation


def inv_frequencies(config: ModelConfig, sliding: bool = False):
    """(head_dim // 2,) float32 inverse frequencies of the config's RoPE (of its local layers' if `sliding`)."""
    d = config.resolved_head_dim
    exponents = jnp.arange(0, d, 2, dtype=jnp.float32) / d
    if sliding and local_rope(config):
        return 1.0 / (config.rope_local_base_freq ** exponents)
    if config.rope_type == "yarn":
        return _yarn(config, config.rope_theta ** exponents, d)
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
    """rotate_half RoPE tables in float32: (B, S, head_dim) each (of the local layers' RoPE if `sliding`), times
    the RoPE's attention scaling (yarn's; 1 otherwise)."""
    freqs_BxSxHalf = positions_BxS.astype(jnp.float32)[..., None] * inv_frequencies(config, sliding)
    emb = jnp.concatenate([freqs_BxSxHalf, freqs_BxSxHalf], axis=-1)
    scale = attention_scaling(config, sliding)
    if scale == 1.0:
        return jnp.cos(emb), jnp.sin(emb)
    return jnp.cos(emb) * scale, jnp.sin(emb) * scale


def apply_rope(x_BxSxHxDh, cos_BxSxDh, sin_BxSxDh):
    half = x_BxSxHxDh.shape[-1] // 2
    x1, x2 = x_BxSxHxDh[..., :half], x_BxSxHxDh[..., half:]
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    cos, sin = cos_BxSxDh[:, :, None, :], sin_BxSxDh[:, :, None, :]
    return (x_BxSxHxDh.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin).astype(x_BxSxHxDh.dtype)
