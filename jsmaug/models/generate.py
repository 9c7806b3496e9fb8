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
the params are placed by the run's rule table and the rows split over the batch axes, in one process or over
several (each process calls with the same arguments and reads every row's tokens).

The decoding step of the seven HF families (LoRA and QLoRA included) is `fast_decode.fast_step`
(jsmaug/models/fast_decode.py: per-layer weights formed once per call, q/k/v and gate/up fused, per-layer caches
written in place); any other config (Gemma, a config field added since) decodes with `decoder.decode`.
tests/test_generate.py holds both to HF `generate` and to each other; tests/test_generate_qlora.py a QLoRA
policy's to its dequantized model; docs/performance.md has their speed.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jsmaug.models import decoder as model
from jsmaug.models.config import ModelConfig
from jsmaug.models.fast_decode import decode_weights, fast_step, fast_step_applies
from jsmaug.parallel import sharding as shd

CHUNK = 32  # decoding steps per jitted call (the host checks for finished rows between calls)
NUCLEUS_CANDIDATES = 256  # top-p draws among a row's this many most likely tokens when they hold its nucleus


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


def _ordered_u32(x):
    """uint32 keys in the order of the float32 values (negative floats: every bit flipped; others: the sign bit
    set), and back (`_float_of`)."""
    b = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    return jnp.where(b >> 31 == 1, ~b, b | jnp.uint32(0x80000000))


def _float_of(key):
    return jax.lax.bitcast_convert_type(jnp.where(key >> 31 == 1, key ^ jnp.uint32(0x80000000), ~key), jnp.float32)


def _nucleus_cutoff(logits_BxV, top_p: float):
    """Per row, the smallest logit that top-p keeps, found without a sort: the smallest value c with
    mass(logits > c) < top_p, which is `_filter_logits`' cutoff (a value c is kept iff the mass of the values above
    it is below top_p). A bisection over the floats in their order (`_ordered_u32`), 32 halvings of the row's
    [min, max] key range, each a masked sum over the vocabulary: 32 x 49K rows in milliseconds, where the sort
    took 480 ms (docs/performance.md)."""
    probs = jax.nn.softmax(logits_BxV.astype(jnp.float32), axis=-1)
    keys = _ordered_u32(logits_BxV)
    lo, hi = keys.min(axis=-1), keys.max(axis=-1)  # the answer is in [lo, hi]: mass(> max) = 0 < top_p

    def halve(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        below_p = jnp.sum(jnp.where(keys > mid[:, None], probs, 0.0), axis=-1) < top_p
        return jnp.where(below_p, lo, mid + 1), jnp.where(below_p, mid, hi)

    lo, _ = jax.lax.fori_loop(0, 32, halve, (lo, hi))
    return _float_of(lo)


def _filter_logits_unsorted(logits_BxV, sc: SamplingConfig):
    """`_filter_logits` with the top-p cutoff from `_nucleus_cutoff` instead of a sort of the vocabulary."""
    if sc.top_p >= 1.0:
        return _filter_logits(logits_BxV, sc)
    logits = _filter_logits(logits_BxV, dataclasses.replace(sc, top_p=1.0))
    return jnp.where(logits < _nucleus_cutoff(logits, sc.top_p)[:, None], -jnp.inf, logits)


def _next_token(logits_BxV, keys_B, pos_B, sc: SamplingConfig):
    """The token at position `pos_B` of each row: argmax, or a draw with the row's key folded with that position
    (so a row's draws depend on its own key, prompt length and logits only: not on the batch it shares).

    With top-k or top-p the draw is among the candidates alone: the row's `NUCLEUS_CANDIDATES` (or top_k) most
    likely tokens from `lax.top_k`, filtered as `_filter_logits` filters the whole vocabulary (top-p's mass
    normalised over the whole vocabulary, or over the top-k when top-k is on). A row whose kept set does not close
    within them (the nucleus needs more tokens, or a tie at the edge) is drawn from the whole filtered vocabulary
    instead, computed only when some row needs it. A full sort of a 49K vocabulary per step took 480 ms for 32
    rows on the 2-core CPU, `lax.top_k` 15 ms with the draw (docs/making-pairs.md)."""
    if sc.temperature == 0:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    step_keys_B = jax.vmap(jax.random.fold_in)(keys_B, pos_B)
    draw = jax.vmap(lambda key, logits_V: jax.random.categorical(key, logits_V))
    k = sc.top_k or NUCLEUS_CANDIDATES
    if (not sc.top_k and sc.top_p >= 1.0) or k + 1 > logits_BxV.shape[-1]:
        return draw(step_keys_B, _filter_logits(logits_BxV, sc)).astype(jnp.int32)
    logits = logits_BxV / sc.temperature
    # The barrier keeps XLA's CPU TopK kernel: with the indices gathered from directly, the top_k became a full
    # sort of the vocabulary (443 ms against 9 ms for 32 x 49K).
    vals_BxK1, idx_BxK1 = jax.lax.optimization_barrier(jax.lax.top_k(logits, k + 1))  # descending
    cand, after = vals_BxK1[:, :k], vals_BxK1[:, k]
    fits = after < cand[:, -1]  # the top k are a set of their own (no tie at the edge)
    if sc.top_p < 1.0:
        lse = jax.nn.logsumexp(cand if sc.top_k else logits, axis=-1, keepdims=True)
        probs = jnp.exp(cand - lse)
        mass = jnp.cumsum(probs, axis=-1)
        keep = mass - probs < sc.top_p  # as `_filter_logits`: the smallest prefix reaching top_p
        cutoff = jnp.min(jnp.where(keep, cand, jnp.inf), axis=-1)
        fits &= (after < cutoff) & ((mass[:, -1] >= sc.top_p) if not sc.top_k else True)
        cand = jnp.where(cand < cutoff[:, None], -jnp.inf, cand)
    token = jnp.take_along_axis(idx_BxK1, draw(step_keys_B, cand)[:, None], axis=1)[:, 0]
    whole = jax.lax.cond(jnp.all(fits), lambda: token,
                         lambda: draw(step_keys_B, _filter_logits_unsorted(logits_BxV, sc)))
    return jnp.where(fits, token, whole).astype(jnp.int32)


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


# ---------------------------------------------------------------------------------------------- prefill, chunks

@functools.partial(jax.jit, static_argnums=(0, 4, 5, 6))
def _prefill(config: ModelConfig, params, ids_BxP, mask_BxP, sc: SamplingConfig, total: int, fast: bool, keys_B):
    """The prompt through the model into a cache of `total` slots, and the first new token. Returns the decoding
    state (next token, its position, the valid slots, the cache, the rows' keys); with `fast`, the cache is per
    layer in `fast_step`'s layout."""
    b, p = ids_BxP.shape
    kv_valid_BxT = jnp.concatenate([mask_BxP, jnp.zeros((b, total - p), jnp.int32)], axis=1)
    positions_BxP = jnp.maximum(jnp.cumsum(mask_BxP, axis=1) - 1, 0)
    logits, cache = model.decode(config, params, ids_BxP, positions_BxP, kv_valid_BxT,
                                 model.init_cache(config, b, total), 0)
    if fast:  # (L, B, T, K, Dh) -> per layer keys (B, K, Dh, T) and values (B, K, T, Dh), once
        cache = tuple((k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3)) for k, v in zip(*cache))
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
            logits, cache = fast_step(config, weights, token, pos, kv_valid, cache, slot + i)
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
    rows split over the batch axes (B a multiple of `batch_rows_divisor`). A mesh may span processes: each process
    then holds the same host values and hands over its own devices' parts (`sharding.put_global`); the keys travel
    as their raw data."""
    params = shd.put_global(params, shd.param_shardings(config, mesh, mesh_config))
    rows = shd.rows_sharding(mesh, mesh_config)
    if not shd.spans_processes(mesh):
        return params, [jax.device_put(a, rows) for a in arrays]
    ids, mask, keys = arrays
    key_rows = NamedSharding(mesh, P(rows.spec[0] if len(rows.spec) else None, None))
    data = shd.put_global(np.asarray(jax.random.key_data(keys)), key_rows)
    return params, [shd.put_global(np.asarray(ids), rows), shd.put_global(np.asarray(mask), rows), _wrap_keys(data)]


_wrap_keys = jax.jit(jax.random.wrap_key_data)


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
    params are placed by the run's rule table and the rows split over its batch axes. A mesh may span processes
    (`jsmaug launch`): every process then calls `generate` with the same arguments (a collective), and every
    process gets every row's tokens (`sharding.to_host`), so all see the same finished rows and run the same
    programs."""
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

    take(shd.to_host(state[0]).tolist())
    slot = p
    while not all(finished):
        state, tokens_CxB = _decode_chunk(config, weights, sc, chunk, fast, state, jnp.int32(slot))
        for tokens_B in shd.to_host(tokens_CxB).tolist():
            take(tokens_B)
        slot += chunk
    return rows[:b_real]
