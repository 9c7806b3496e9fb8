"""Per-sequence log-probabilities of completions, without ever building the (B, S, V) logits.

`sequence_logps_from_hidden` is the trainer's kernel: from the final hidden states it unembeds only the
completion positions (`loss_mask`), a chunk of positions per row at a time, and returns per-row sums. Two
per-token variants are computed inside it, so they cost no logits either:

- token weights (LD-DPO, arXiv 2409.06411): `sum_t w_t log p_t` instead of `sum_t log p_t`; `ld_weights` builds
  TRL 1.16's weights (1 on the first min(len_c, len_r) completion tokens of a pair, `ld_alpha` on the tail).
- WPO (arXiv 2406.11827, TRL's `use_weighting`): the per-row sum of `log p_t - log sum_v p_v^2`, the
  probabilities aligned by the log-sum-of-squared-probabilities, from which `losses.wpo_weights` makes the pair
  weights. It is computed without a gradient (TRL computes it under no_grad).

Labels are already shifted (`labels[t]` is the token that position t predicts).
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import chex
import jax
import jax.numpy as jnp

from jsmaug.segments import run_starts


class SequenceLogps(NamedTuple):
    logps: jax.Array  # (B,) float32: sum over loss_mask positions of w_t * log p(label_t)
    num_tokens: jax.Array  # (B,) int32: loss_mask positions
    logps_unweighted: jax.Array  # (B,) float32: the same without the token weights
    aligned_logps: jax.Array | None  # (B,) float32, no gradient: sum of log p_t - log sum_v p_v^2 (WPO), if asked


def _label_logps(logits_BxSxV, labels_BxS, with_sum_sq: bool = False):
    """log p(label) per position; with `with_sum_sq`, stacked with log sum_v p_v^2 (last axis: 2)."""
    return _label_logps_and_lse(logits_BxSxV, labels_BxS, with_sum_sq)[0]


def _label_logps_and_lse(logits_BxSxV, labels_BxS, with_sum_sq: bool):
    """(`_label_logps`, the log-sum-exp per position)."""
    logits = logits_BxSxV.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    lp = jnp.take_along_axis(logits, labels_BxS[..., None], axis=-1)[..., 0] - lse
    if with_sum_sq:
        log_sum_sq = jax.lax.stop_gradient(jax.nn.logsumexp(2.0 * logits, axis=-1) - 2.0 * lse)
        lp = jnp.stack([lp, log_sum_sq], axis=-1)
    return lp, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _unembed_label_logps(h_BxCxD, w_DxV, labels_BxC, with_sum_sq: bool = False, vd: bool = False):
    """`_label_logps(h @ w, labels)` with a hand-written backward: the forward keeps only the log-sum-exp, and the
    backward recomputes the logits once and forms d logits = g * (onehot - softmax) in one pass. Autodiff of the
    rematerialised chunk instead recomputes the log-sum-exp's reductions and takes a second exp pass
    (docs/performance.md: the kernel alone 1.56x faster on CPU)."""
    return _unembed_label_logps_fwd(h_BxCxD, w_DxV, labels_BxC, with_sum_sq, vd)[0]


def _logits(h_BxCxD, w, vd: bool = False):
    """h @ w in float32; `vd`: w is the (V, D) table as a tied model stores it, not the (D, V) matrix."""
    return jnp.einsum("bcd,vd->bcv" if vd else "bcd,dv->bcv", h_BxCxD.astype(w.dtype), w,
                      preferred_element_type=jnp.float32)


def _unembed_label_logps_fwd(h_BxCxD, w_DxV, labels_BxC, with_sum_sq, vd):
    # with_sum_sq: the second feature has no gradient (WPO), so the backward ignores its cotangent
    lp, lse = _label_logps_and_lse(_logits(h_BxCxD, w_DxV, vd), labels_BxC, with_sum_sq)
    return lp, (h_BxCxD, w_DxV, labels_BxC, lse)


def _chunk_grads(h, w, labels, lse, g, vd: bool = False):
    """(dh in h's dtype, dw in float32, always (D, V)) of sum(g * log p(label)) for one chunk: the logits
    recomputed once, d logits = g * (onehot - softmax). The weight gradient stays (D, V) for a (V, D) table too:
    that GEMM's (V, D) form ran 1.7x slower on CPU at Gemma 3's shapes (docs/performance.md)."""
    onehot = jnp.arange(w.shape[0] if vd else w.shape[1], dtype=labels.dtype) == labels[..., None]
    dlogits = (g[..., None] * (onehot.astype(jnp.float32) - jnp.exp(_logits(h, w, vd) - lse[..., None]))
               ).astype(w.dtype)
    dh = jnp.einsum("bcv,vd->bcd" if vd else "bcv,dv->bcd", dlogits, w,
                    preferred_element_type=jnp.float32).astype(h.dtype)
    return dh, jnp.einsum("bcd,bcv->dv", h.astype(w.dtype), dlogits, preferred_element_type=jnp.float32)


def _unembed_label_logps_bwd(with_sum_sq, vd, res, g):
    h, w, labels, lse = res
    dh, dw = _chunk_grads(h, w, labels, lse, g[..., 0] if with_sum_sq else g, vd)
    return dh, (dw.T if vd else dw).astype(w.dtype), None


_unembed_label_logps.defvjp(_unembed_label_logps_fwd, _unembed_label_logps_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _chunk_loop(with_aligned: bool, chunk: int, vd: bool, w_DxV, h_BxSxD, labels_BxS, longest):
    """`_unembed_label_logps` over the sequence, `chunk` positions per row at a time, for the chunks that hold any
    of the first `longest` positions (a loop of run-time length, forward and backward: S a multiple of `chunk`).

    The whole loop is one custom VJP. A `lax.map` of per-chunk custom VJPs under `lax.cond` (the earlier kernel, and
    still the path of a callable unembedding) makes the cond's outputs the scan's residuals: the (D, V) matrix
    stacked once per chunk into a zero-filled buffer, and copied each chunk. Here the residuals are the inputs
    and the (B, S) log-sum-exp, and the backward accumulates dW in its loop's carry."""
    return _chunk_loop_fwd(with_aligned, chunk, vd, w_DxV, h_BxSxD, labels_BxS, longest)[0]


def _live_chunks(longest, chunk):
    return (longest + chunk - 1) // chunk


def _chunk_loop_fwd(with_aligned, chunk, vd, w_DxV, h_BxSxD, labels_BxS, longest):
    b, s, _ = h_BxSxD.shape
    lp = jnp.zeros((b, s, 2) if with_aligned else (b, s), jnp.float32)
    lse = jnp.zeros((b, s), jnp.float32)

    def body(i, carry):
        lp, lse = carry
        hc = jax.lax.dynamic_slice_in_dim(h_BxSxD, i * chunk, chunk, axis=1)
        lc = jax.lax.dynamic_slice_in_dim(labels_BxS, i * chunk, chunk, axis=1)
        lp_c, lse_c = _label_logps_and_lse(_logits(hc, w_DxV, vd), lc, with_aligned)
        return (jax.lax.dynamic_update_slice_in_dim(lp, lp_c, i * chunk, axis=1),
                jax.lax.dynamic_update_slice_in_dim(lse, lse_c, i * chunk, axis=1))

    lp, lse = jax.lax.fori_loop(0, _live_chunks(longest, chunk), body, (lp, lse))
    return lp, (w_DxV, h_BxSxD, labels_BxS, longest, lse)


def _chunk_loop_bwd(with_aligned, chunk, vd, res, g):
    w, h, labels, longest, lse = res
    g = g[..., 0] if with_aligned else g  # the aligned feature has no gradient (WPO)

    def body(i, carry):
        dh, dw = carry
        sl = lambda a: jax.lax.dynamic_slice_in_dim(a, i * chunk, chunk, axis=1)  # noqa: E731
        dh_c, dw_c = _chunk_grads(sl(h), w, sl(labels), sl(lse), sl(g), vd)
        return jax.lax.dynamic_update_slice_in_dim(dh, dh_c, i * chunk, axis=1), dw + dw_c

    dw_shape = w.shape[::-1] if vd else w.shape  # accumulated as (D, V) either way
    dh, dw = jax.lax.fori_loop(0, _live_chunks(longest, chunk), body,
                               (jnp.zeros_like(h), jnp.zeros(dw_shape, jnp.float32)))
    return (dw.T if vd else dw).astype(w.dtype), dh, None, None


_chunk_loop.defvjp(_chunk_loop_fwd, _chunk_loop_bwd)


def ld_weights(loss_mask_BxS, ld_alpha: float, sequence_ids_BxS=None, num_sequences: int | None = None
               ) -> jax.Array:
    """LD-DPO's token weights for a [chosen; rejected] batch (TRL 1.16): per pair, the first min(len_c, len_r)
    completion tokens weigh 1 and the rest `ld_alpha`; positions outside the mask weigh 0. Packed rows pass
    their `sequence_ids`: a sequence's positions are a run of its id in a row (with shared prompts, the rejected
    branch's run starts past the chosen one, though its positions do not restart at 0)."""
    mask = (jnp.asarray(loss_mask_BxS) > 0).astype(jnp.int32)
    pos = jnp.cumsum(mask, axis=1)  # 1-based position within the completion
    if sequence_ids_BxS is None:
        lens = jnp.sum(mask, axis=1)
        half = lens.shape[0] // 2
        shared = jnp.minimum(lens[:half], lens[half:])
        shared = jnp.concatenate([shared, shared])[:, None]
    else:
        # Within a packed row, count from the start of each sequence's run: subtract the count before it.
        ids = jnp.asarray(sequence_ids_BxS)
        start = run_starts(ids)
        before = jnp.where(start > 0, jnp.take_along_axis(pos, jnp.maximum(start - 1, 0), axis=1), 0)
        pos = pos - before
        lens = jax.ops.segment_sum(mask.reshape(-1), ids.reshape(-1), num_segments=num_sequences)
        half = num_sequences // 2
        shared = jnp.minimum(lens[:half], lens[half:])
        shared = jnp.concatenate([shared, shared])[ids]
    return (mask * jnp.where(pos <= shared, 1.0, ld_alpha)).astype(jnp.float32)


def sequence_logps(logits_BxSxV, labels_BxS, loss_mask_BxS, *, chunk_size: int | None = None):
    """Per-sequence sum of log p(label) over `loss_mask` tokens, from logits. Returns (sum_logps (B,) float32,
    num_tokens (B,) int32). Never builds a float32 log_softmax beside the logits (gather minus logsumexp); with
    `chunk_size` the float32 upcast happens one sequence chunk at a time."""
    chex.assert_rank(logits_BxSxV, 3)
    chex.assert_rank([labels_BxS, loss_mask_BxS], 2)
    chex.assert_equal_shape([labels_BxS, loss_mask_BxS, logits_BxSxV[..., 0]])
    if not jnp.issubdtype(logits_BxSxV.dtype, jnp.floating):
        raise TypeError(f"logits must be floating point, got {logits_BxSxV.dtype}")
    if not jnp.issubdtype(labels_BxS.dtype, jnp.integer):
        raise TypeError(f"labels must be integers, got {labels_BxS.dtype}")
    mask = loss_mask_BxS.astype(jnp.float32)
    if chunk_size is None or chunk_size >= logits_BxSxV.shape[1]:
        lp = _label_logps(logits_BxSxV, labels_BxS)
    else:
        lp = _chunked_over_sequence(_label_logps, logits_BxSxV, labels_BxS, chunk_size)
    return jnp.sum(lp * mask, axis=1), jnp.sum(loss_mask_BxS.astype(jnp.int32), axis=1)


def sequence_logps_from_hidden(hidden_BxSxD, unembed: Callable | jax.Array, labels_BxS, loss_mask_BxS, *,
                               chunk_size: int | None = None, token_weights_BxS=None,
                               with_aligned: bool = False, sequence_ids_BxS=None,
                               num_sequences: int | None = None, table_vd: bool = False,
                               row_groups: int | None = None) -> SequenceLogps:
    """Per-row completion log-probs from final hidden states and the unembedding: a (D, V) matrix (the trainer's
    case: logits = h @ w in float32, with the hand-written backward of `_unembed_label_logps`) or any
    `unembed(h) -> logits` function (autodiff through it).

    With `chunk_size`, only the `loss_mask` positions are unembedded: each row's are gathered to its front and
    processed `chunk_size` positions per row (B * chunk_size rows) at a time, and chunks past the longest row's
    masked positions are skipped at run time (`lax.cond`); the batch axis stays whole, so it stays sharded.
    Prompt and padding positions never reach the vocabulary matmul and log-softmax, forward or backward. Each
    chunk is recomputed in the backward pass, so the (rows, V) logits exist one chunk at a time.
    `token_weights_BxS` (LD-DPO) weighs each position's log-prob; `with_aligned` adds WPO's aligned sum.
    Packed rows (`jsmaug.data.packing`) hold several sequences: with `sequence_ids_BxS` the sums are per sequence
    (`num_sequences` of them), not per row. `table_vd`: `unembed` is a tied model's (V, D) embedding table as it is
    stored, used as it is (no (D, V) transposed copy; the weight gradient comes back (V, D)).

    `row_groups` (with `chunk_size`): the rows are laid end to end in that many groups (the trainer passes its data
    shards, so each device's rows stay its own), and each group's masked positions are gathered to its front, so the
    chunks follow the masked positions of all its rows together, not those of its longest row. Rows whose
    completions differ in length (a padded batch; packed rows) then skip the chunks their short rows would have
    padded: the DPO step measured 9-13% faster on packed rows (docs/performance.md). The values are the same.
    """
    chex.assert_rank(hidden_BxSxD, 3)
    mask = loss_mask_BxS.astype(jnp.float32)

    features = 2 if with_aligned else 0
    if callable(unembed):
        def chunk_fn(h, lb):
            return _label_logps(unembed(h), lb, with_aligned)
        chunk_fn = jax.checkpoint(chunk_fn) if chunk_size is not None else chunk_fn
    else:
        chex.assert_rank(unembed, 2)
        chunk_fn = lambda h, lb: _unembed_label_logps(h, unembed, lb, with_aligned, table_vd)  # noqa: E731

    if chunk_size is None:
        out = chunk_fn(hidden_BxSxD, labels_BxS)
    else:
        def loop(h, lb, longest, chunk):
            return _chunk_loop(with_aligned, chunk, table_vd, unembed, h, lb, longest)
        b, s, _ = hidden_BxSxD.shape
        groups = row_groups if row_groups and b % row_groups == 0 else b
        per = b // groups  # rows laid end to end in each group
        grouped = (x.reshape(groups, per * s, *x.shape[2:]) for x in (hidden_BxSxD, jnp.asarray(labels_BxS),
                                                                         jnp.asarray(loss_mask_BxS)))
        out = _masked_positions_only(chunk_fn if callable(unembed) else None, *grouped, chunk_size * per, features,
                                     None if callable(unembed) else loop)
        out = out.reshape(b, s, *out.shape[2:])
    lp = out[..., 0] if with_aligned else out
    if sequence_ids_BxS is None:
        total = functools.partial(jnp.sum, axis=1)
    else:
        ids = jnp.asarray(sequence_ids_BxS).reshape(-1)
        total = lambda x: jax.ops.segment_sum(x.reshape(-1), ids, num_segments=num_sequences)  # noqa: E731
    plain = total(lp * mask)
    weighted = plain if token_weights_BxS is None else total(lp * mask * token_weights_BxS)
    aligned = None
    if with_aligned:
        aligned = jax.lax.stop_gradient(total((lp - out[..., 1]) * mask))
    return SequenceLogps(weighted, total(loss_mask_BxS.astype(jnp.int32)), plain, aligned)


def _masked_positions_only(fn, h_BxSxD, labels_BxS, mask_BxS, chunk: int, features: int = 0, loop=None):
    """fn(h (B, chunk, D), labels (B, chunk)) -> (B, chunk[, features]) on the masked positions only; 0 elsewhere.

    Within each row, the masked positions are moved to the front (a stable per-row sort), and the rows are
    processed `chunk` positions at a time; chunks past the longest row's count are skipped at run time. The batch
    axis is never flattened, so on a mesh each device unembeds only its own rows (a global gather over the
    flattened batch would make every device do every row's work). Positions past a row's count are fed zeros.
    `loop(h_sorted, labels_sorted, longest, chunk)`, if given, replaces the map over chunks (`_chunk_loop`)."""
    b, s, d = h_BxSxD.shape
    tail = (features,) if features else ()
    labels_BxS, mask_BxS = jnp.asarray(labels_BxS), jnp.asarray(mask_BxS)
    chunk = min(chunk, s)
    pad = -s % chunk
    keep_BxS = mask_BxS > 0
    order_BxS = jnp.argsort(~keep_BxS, axis=1, stable=True)  # masked positions first, in order
    count_B = jnp.sum(keep_BxS.astype(jnp.int32), axis=1)
    live_BxS = jnp.arange(s)[None, :] < count_B[:, None]
    h_sorted = jnp.where(live_BxS[..., None], jnp.take_along_axis(h_BxSxD, order_BxS[..., None], axis=1), 0)
    h_sorted = jnp.pad(h_sorted, ((0, 0), (0, pad), (0, 0)))
    lb_sorted = jnp.pad(jnp.take_along_axis(labels_BxS, order_BxS, axis=1), ((0, 0), (0, pad)))
    longest = jnp.max(count_B)

    def one(i):
        hc = jax.lax.dynamic_slice_in_dim(h_sorted, i * chunk, chunk, axis=1)
        lc = jax.lax.dynamic_slice_in_dim(lb_sorted, i * chunk, chunk, axis=1)
        return jax.lax.cond(i * chunk < longest, lambda: fn(hc, lc).astype(jnp.float32),
                            lambda: jnp.zeros((b, chunk, *tail), jnp.float32))

    if loop is not None:
        lp_BxS = loop(h_sorted, lb_sorted, longest, chunk)[:, :s]
    else:
        lp_NxBxC = jax.lax.map(one, jnp.arange((s + pad) // chunk))
        lp_BxS = jnp.moveaxis(lp_NxBxC, 0, 1).reshape(b, s + pad, *tail)[:, :s]
    live = live_BxS[..., None] if features else live_BxS
    lp_BxS = jnp.where(live, lp_BxS, 0.0)
    rows_BxS = jnp.broadcast_to(jnp.arange(b)[:, None], (b, s))
    return jnp.zeros((b, s, *tail), jnp.float32).at[rows_BxS, order_BxS].set(lp_BxS, unique_indices=True)


def _chunked_over_sequence(fn, x_BxSx_, labels_BxS, chunk: int):
    b, s = labels_BxS.shape
    pad = -s % chunk
    x = jnp.pad(x_BxSx_, ((0, 0), (0, pad), (0, 0)))
    lb = jnp.pad(labels_BxS, ((0, 0), (0, pad)))
    n = (s + pad) // chunk
    xs = x.reshape(b, n, chunk, x.shape[-1]).swapaxes(0, 1)
    ls = lb.reshape(b, n, chunk).swapaxes(0, 1)
    out = jax.lax.map(lambda a: fn(a[0], a[1]), (xs, ls))  # (n, B, chunk)
    return out.swapaxes(0, 1).reshape(b, s + pad)[:, :s]
