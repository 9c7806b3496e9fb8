"""Text generation with a KV cache: greedy, or sampled with temperature / top-k / top-p.

Prompts of different lengths are LEFT-padded to a common length P (rounded up to a multiple of 16, so a few
prompt lengths share one compiled program), as HF `generate` does for decoder-only models: every row's last
prompt token then sits in slot P - 1 and new tokens are appended in the same slot for every row. Positions
count real tokens only (HF: cumsum(attention_mask) - 1), so a padded row computes exactly what it would alone.

One jitted program: a prefill over the prompt, then `lax.scan` over the new tokens, one token per step, with
the cache (layers, batch, P + max_new_tokens, kv_heads, head_dim) updated in place. A row that emits
`eos_id` is finished; its later tokens are `pad_id` (HF's behaviour with a pad token set).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jsmaug.models import decoder as model
from jsmaug.models.config import MixtralConfig


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


def _next_token(logits_BxV, rng, sc: SamplingConfig):
    if sc.temperature == 0:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    return jax.random.categorical(rng, _filter_logits(logits_BxV, sc), axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=(0, 4))
def _generate(config: MixtralConfig, params, ids_BxP, mask_BxP, sc: SamplingConfig, rng):
    b, p = ids_BxP.shape
    n = sc.max_new_tokens
    t = p + n
    kv_valid = jnp.concatenate([mask_BxP, jnp.zeros((b, n), jnp.int32)], axis=1)
    positions = jnp.maximum(jnp.cumsum(mask_BxP, axis=1) - 1, 0)
    logits, cache = model.decode(config, params, ids_BxP, positions, kv_valid, model.init_cache(config, b, t), 0)
    next_pos = positions[:, -1] + 1
    rng, sub = jax.random.split(rng)
    first = _next_token(logits[:, -1], sub, sc)

    def step(carry, i):
        token, pos, kv_valid, cache, done, rng = carry
        out = jnp.where(done, sc.pad_id, token)
        if sc.eos_id is not None:
            done = done | (token == sc.eos_id)
        kv_valid = kv_valid.at[:, p + i].set(1)
        logits, cache = model.decode(config, params, token[:, None], pos[:, None], kv_valid, cache, p + i)
        rng, sub = jax.random.split(rng)
        return (_next_token(logits[:, -1], sub, sc), pos + 1, kv_valid, cache, done, rng), out

    init = (first, next_pos, kv_valid, cache, jnp.zeros((b,), bool), rng)
    _, tokens_NxB = jax.lax.scan(step, init, jnp.arange(n))
    return tokens_NxB.T


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


def generate(config: MixtralConfig, params, prompts: Sequence[Sequence[int]], sampling: SamplingConfig = SamplingConfig(),
             seed: int = 0, pad_multiple: int = 16) -> list[list[int]]:
    """New token ids for every prompt (a list of token id lists, BOS included if wanted). Finished rows stop at
    (and include) their EOS token; the pad tokens after it are removed."""
    if config.max_position_embeddings and max(len(x) for x in prompts) + sampling.max_new_tokens > \
            config.max_position_embeddings:
        raise ValueError(f"prompt + max_new_tokens exceeds max_position_embeddings={config.max_position_embeddings}")
    ids, mask = left_pad(prompts, pad_multiple, sampling.pad_id)
    out = np.asarray(_generate(config, params, jnp.asarray(ids), jnp.asarray(mask), sampling, jax.random.key(seed)))
    result = []
    for row in out.tolist():
        if sampling.eos_id is not None and sampling.eos_id in row:
            row = row[:row.index(sampling.eos_id) + 1]
        result.append(row)
    return result
