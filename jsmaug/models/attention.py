"""Causal self-attention with padding, packed segments, a sliding window and GQA/MQA, in several kernels.

One meaning, several paths (`implementation=`), each tested against `xla`:

- "xla":     the reference. Builds the (B, K, G, S, T) float32 scores: O(S^2) memory per layer, forward and backward.
- "chunked": memory-efficient attention in pure JAX (query and key blocks with an online softmax, as in
             FlashAttention), with a hand-written VJP that recomputes each block's probabilities from the saved
             log-sum-exp. O(S x block) temporaries in the forward and the backward, on every backend; key blocks
             that the causal or sliding-window mask rules out, or that pair two different packed segments of
             every row, are skipped at run time.
- "cudnn":   `jax.nn.dot_product_attention(implementation="cudnn")` on GPU, for bf16/fp16 and head_dim <= 256. It has
             no segment ids: a batch whose rows each hold one segment followed by padding runs there (padding
             becomes key/query lengths); a packed batch (several segments in a row) takes the `chunked` branch
             at run time (`lax.cond`), so the result is right whatever the data.
- "splash":  the Pallas TPU splash kernel (jsmaug/models/splash.py), under shard_map on a mesh; off TPU it runs in Pallas
             interpret mode (exact, slow: for tests on CPU).
- "auto":    `resolve_impl` picks per backend, dtype and head_dim, and says why.

The mask, in every path: query i sees key j when j <= i, both carry the same segment id, the key's segment id is
not 0 (padding), and, with a sliding window w, i - j < w (HF's convention).

Shared prompts (`data.share_prompt`, jsmaug/data/packing.py): a pair laid out once as prompt, chosen branch,
rejected branch carries the ids of `segments.shared_id` (its unit in the row, and the part), and a query also sees
the keys of its own unit's prompt (`segments.visible`). Ordinary ids stay below `segments.SHARED`, where nothing
changes; the rule applies only where asked (`shared`, the model config's `shared_prompt_masks`, which such a run
sets), so every other program stays as it was. A sliding window there goes by `segments.window_index` (a branch's
distance to its prompt is its position's). `xla`, `chunked` and `cudnn` (it sends such rows to `chunked`) take them;
`splash` does not (the run's config refuses it).

Attention sinks (gpt-oss, `sinks_H`: one learned logit per query head): the sink joins each row's softmax
denominator and nothing else, `p_j = exp(s_j) / (sum_j' exp(s_j') + exp(sink_h))` (HF's gpt_oss
`eager_attention_forward`), as a key whose value is 0 would. `xla`, `chunked` (its online softmax starts from the
sink: m = sink, l = 1; the VJP adds d sink = -sum_rows exp(sink - lse) * rowsum(dO * O)) and `splash` (the kernel's
own `sinks`) take them; `cudnn` has none and refuses them, and `auto` never picks it for a model with sinks.

Array names carry their shapes: B batch, S queries, T keys, H query heads, K kv heads, G = H / K, Dh head dim.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jsmaug.errors import ConfigError
from jsmaug.models import splash

from jsmaug.parallel import mesh_context
from jsmaug.segments import SHARED, segment_bounds, visible, window_index

IMPLEMENTATIONS = ("auto", "xla", "chunked", "cudnn", "splash")
NEG_INF = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite, so fully masked (padding) rows never give NaN
# On CPU, `chunked` runs blocks of at most this many tokens: 1.13-2.17x faster than 512 on 11 of 12 rows of 1,024 to
# 4,096 tokens, packed or not, 0.98x on the twelfth (`python -m jsmaug.perf.attention_blocks`; docs/performance.md,
# "Attention blocks on CPU").
CPU_CHUNK_BLOCK = 256


def _segments_visible(seg_q, seg_k, shared: bool):
    """`visible` where shared-prompt units may occur (a static choice); else the plain rule, whose program is
    the one every other run has always compiled."""
    return visible(seg_q, seg_k) if shared else (seg_q == seg_k) & (seg_k > 0)


def mask_BxSxT(segment_ids_BxS, sliding_window: int | None, kv_segment_ids_BxT=None, q_index_BxS=None,
               kv_index_BxT=None, shared: bool = False):
    """Causal + same-segment (packing; with `shared`, shared-prompt units: `visible`) + not-padding (segment 0)
    + optional sliding window (with `shared`, by `segments.window_index`), as booleans."""
    kv_seg = segment_ids_BxS if kv_segment_ids_BxT is None else kv_segment_ids_BxT
    s, t = segment_ids_BxS.shape[1], kv_seg.shape[1]
    q_idx = jnp.arange(s)[None, :] if q_index_BxS is None else q_index_BxS
    k_idx = jnp.arange(t)[None, :] if kv_index_BxT is None else kv_index_BxT
    q_idx, k_idx = q_idx[:, :, None], k_idx[:, None, :]
    mask = (k_idx <= q_idx) & _segments_visible(segment_ids_BxS[:, :, None], kv_seg[:, None, :], shared)
    if sliding_window is not None:
        if shared and kv_segment_ids_BxT is None and q_index_BxS is None:
            w = window_index(segment_ids_BxS)
            q_idx, k_idx = w[:, :, None], w[:, None, :]
        mask &= (q_idx - k_idx) < sliding_window  # HF: a query sees keys with q - k < window (itself included)
    return mask


def xla_attention(q_BxSxHxDh, k_BxTxKxDh, v_BxTxKxDh, mask, sinks_H=None):
    """The reference: float32 scores and softmax, probabilities cast to the compute dtype for the PV matmul.
    `sinks_H` (float32, one logit per query head) joins the softmax's denominator only.

    Head-major, with the G query heads of each kv head folded into the query axis, so each product is one plain
    (G*S, Dh) x (Dh, T) matmul per (batch row, kv head) with no transposes inside the dot: on the 2-core CPU
    this layout ran fwd+bwd 1.33x to 1.69x faster than the (B, S, K, G, Dh) einsums it replaced (2 x 512 tokens
    with 8 heads of 128, and 8 x 256 with 4 of 64; docs/performance.md, 2026-12-02)."""
    b, s, h, dh = q_BxSxHxDh.shape
    t, kv = k_BxTxKxDh.shape[1], k_BxTxKxDh.shape[2]
    g = h // kv
    q_BxKxQxDh = q_BxSxHxDh.reshape(b, s, kv, g, dh).transpose(0, 2, 3, 1, 4).reshape(b, kv, g * s, dh)
    k_BxKxTxDh, v_BxKxTxDh = k_BxTxKxDh.transpose(0, 2, 1, 3), v_BxTxKxDh.transpose(0, 2, 1, 3)
    scores = jnp.einsum("bkqd,bktd->bkqt", q_BxKxQxDh, k_BxKxTxDh, preferred_element_type=jnp.float32)
    scores = jnp.where(mask[:, None, None, :, :], scores.reshape(b, kv, g, s, t) * (dh ** -0.5), NEG_INF)
    if sinks_H is None:
        probs = jax.nn.softmax(scores, axis=-1)
    else:
        sink_1xKxGx1x1 = sinks_H.astype(jnp.float32).reshape(1, kv, g, 1, 1)
        top = jax.lax.stop_gradient(jnp.maximum(jnp.max(scores, axis=-1, keepdims=True), sink_1xKxGx1x1))
        e = jnp.exp(scores - top)
        probs = e / (jnp.sum(e, axis=-1, keepdims=True) + jnp.exp(sink_1xKxGx1x1 - top))
    probs = probs.astype(q_BxSxHxDh.dtype).reshape(b, kv, g * s, t)
    out = jnp.einsum("bkqt,bktd->bkqd", probs, v_BxKxTxDh)
    return out.reshape(b, kv, g, s, dh).transpose(0, 3, 1, 2, 4).reshape(b, s, h, dh)


# ------------------------------------------------------------------------------------------------ chunked

def _block_mask(seg_q, seg_k, i0, j0, bq, bk, window, shared=False, w_q=None, w_k=None):
    """(B, bq, bk) mask of query block starting at i0 against key block starting at j0; the window by the blocks'
    `segments.window_index` values `w_q`, `w_k` when given (shared prompts), else by the row's indices."""
    qi = i0 + jnp.arange(bq)[:, None]
    kj = j0 + jnp.arange(bk)[None, :]
    m = (kj <= qi)[None] & _segments_visible(seg_q[:, :, None], seg_k[:, None, :], shared)
    if window is not None:
        m &= (w_q[:, :, None] - w_k[:, None, :] < window) if w_q is not None else (qi - kj < window)[None]
    return m


def _key_block_range(i, bq, bk, nk, window):
    """Key blocks [lo, hi) that query block i can see (causal, and the window if any)."""
    hi = jnp.minimum((i * bq + bq - 1) // bk + 1, nk)
    lo = 0 if window is None else jnp.maximum((i * bq - window + 1) // bk, 0)
    return lo, hi


def _query_block_range(j, bq, bk, nq, window):
    """Query blocks [lo, hi) that can see key block j."""
    lo = (j * bk) // bq
    hi = nq if window is None else jnp.minimum((j * bk + bk - 1 + window - 1) // bq + 1, nq)
    return lo, hi


def _segment_block_ranges(seg, bq, bk, shared=False):
    """Packing's block skipping: for each query block, the first key block any of its queries' segments reaches
    (over the batch); for each key block, one past the last query block its keys' segments reach. Blocks
    outside these ranges pair two different segments: fully masked, so skipping them changes nothing."""
    b, s = seg.shape
    start, end = segment_bounds(jnp.where(seg >= SHARED, seg & ~3, seg) if shared else seg)  # a unit: one span
    first_key_block = jnp.min(start.reshape(b, s // bq, bq), axis=(0, 2)) // bk  # (nq,)
    last_query_block = (jnp.max(end.reshape(b, s // bk, bk), axis=(0, 2)) - 1) // bq + 1  # (nk,)
    return first_key_block, last_query_block


def _window_rule(seg, window, shared):
    """(the `segments.window_index` values the window goes by, or None for the row's indices; the window the block
    ranges skip by). Shared prompts with a window: by `window_index`, and no block skipping by the window (a
    rejected branch reaches back past its chosen branch); the units' own spans still bound the blocks."""
    if shared and window is not None:
        return window_index(seg), None
    return None, window


def _scores(q_blk, k_blk, scale):
    # q_blk (B, bq, K, G, Dh), k_blk (B, bk, K, Dh) -> (B, K, G, bq, bk) float32
    return jnp.einsum("bqkgd,btkd->bkgqt", q_blk, k_blk, preferred_element_type=jnp.float32) * scale


def _chunked_fwd_impl(q, k, v, seg, sinks, window, bq, bk, shared=False):
    """q (B, S, K, G, Dh), k/v (B, S, K, Dh), seg (B, S), sinks (K, G) float32 or None; S a multiple of bq and bk.
    Returns out (B, S, K, G, Dh) in q's dtype and lse (B, K, G, S) float32 (0 for rows that see nothing; with
    sinks, the sink's logit for them)."""
    b, s, kv, g, dh = q.shape
    nq, nk = s // bq, s // bk
    scale = dh ** -0.5
    first_key_block, _ = _segment_block_ranges(seg, bq, bk, shared)
    w_idx, block_window = _window_rule(seg, window, shared)

    def q_block(i):
        q_blk = jax.lax.dynamic_slice_in_dim(q, i * bq, bq, axis=1)
        seg_q = jax.lax.dynamic_slice_in_dim(seg, i * bq, bq, axis=1)
        w_q = None if w_idx is None else jax.lax.dynamic_slice_in_dim(w_idx, i * bq, bq, axis=1)

        def body(j, carry):
            m, l, acc = carry
            k_blk = jax.lax.dynamic_slice_in_dim(k, j * bk, bk, axis=1)
            v_blk = jax.lax.dynamic_slice_in_dim(v, j * bk, bk, axis=1)
            seg_k = jax.lax.dynamic_slice_in_dim(seg, j * bk, bk, axis=1)
            w_k = None if w_idx is None else jax.lax.dynamic_slice_in_dim(w_idx, j * bk, bk, axis=1)
            mask = _block_mask(seg_q, seg_k, i * bq, j * bk, bq, bk, window, shared, w_q, w_k)[:, None, None]
            sc = jnp.where(mask, _scores(q_blk, k_blk, scale), NEG_INF)
            m_new = jnp.maximum(m, jnp.max(sc, axis=-1))
            p = jnp.where(mask, jnp.exp(sc - m_new[..., None]), 0.0)
            corr = jnp.exp(m - m_new)
            l = l * corr + jnp.sum(p, axis=-1)
            pv = jnp.einsum("bkgqt,btkd->bkgqd", p.astype(v.dtype), v_blk, preferred_element_type=jnp.float32)
            return m_new, l, acc * corr[..., None] + pv

        lo, hi = _key_block_range(i, bq, bk, nk, block_window)
        lo = jnp.maximum(lo, first_key_block[i])
        if sinks is None:
            m0, l0 = jnp.full((b, kv, g, bq), NEG_INF, jnp.float32), jnp.zeros((b, kv, g, bq), jnp.float32)
        else:  # the sink is a key of value 0 seen first: m = sink, l = exp(sink - m) = 1, nothing added to acc
            m0, l0 = jnp.broadcast_to(sinks[None, :, :, None], (b, kv, g, bq)), jnp.ones((b, kv, g, bq), jnp.float32)
        init = (m0, l0, jnp.zeros((b, kv, g, bq, dh), jnp.float32))
        m, l, acc = jax.lax.fori_loop(lo, hi, body, init)
        seen = l > 0
        out = jnp.where(seen[..., None], acc / jnp.where(seen, l, 1.0)[..., None], 0.0)
        lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), 0.0)
        return out.astype(q.dtype), lse

    out_N, lse_N = jax.lax.map(q_block, jnp.arange(nq))  # (nq, B, K, G, bq, Dh), (nq, B, K, G, bq)
    out = jnp.moveaxis(out_N, 0, 3).reshape(b, kv, g, s, dh).transpose(0, 3, 1, 2, 4)
    lse = jnp.moveaxis(lse_N, 0, 3).reshape(b, kv, g, s)
    return out, lse


def _chunked_bwd_impl(q, k, v, seg, sinks, out, lse, d_out, window, bq, bk, shared=False):
    b, s, kv, g, dh = q.shape
    nq, nk = s // bq, s // bk
    scale = dh ** -0.5
    _, last_query_block = _segment_block_ranges(seg, bq, bk, shared)
    w_idx, block_window = _window_rule(seg, window, shared)
    # D_i = rowsum(dO_i * O_i), per query (B, K, G, S)
    delta = jnp.einsum("bskgd,bskgd->bkgs", d_out.astype(jnp.float32), out.astype(jnp.float32))

    def k_block(carry, j):
        dq = carry
        k_blk = jax.lax.dynamic_slice_in_dim(k, j * bk, bk, axis=1)
        v_blk = jax.lax.dynamic_slice_in_dim(v, j * bk, bk, axis=1)
        seg_k = jax.lax.dynamic_slice_in_dim(seg, j * bk, bk, axis=1)
        w_k = None if w_idx is None else jax.lax.dynamic_slice_in_dim(w_idx, j * bk, bk, axis=1)

        def body(i, inner):
            dq, dk, dv = inner
            q_blk = jax.lax.dynamic_slice_in_dim(q, i * bq, bq, axis=1)
            do_blk = jax.lax.dynamic_slice_in_dim(d_out, i * bq, bq, axis=1)
            seg_q = jax.lax.dynamic_slice_in_dim(seg, i * bq, bq, axis=1)
            lse_blk = jax.lax.dynamic_slice_in_dim(lse, i * bq, bq, axis=3)
            delta_blk = jax.lax.dynamic_slice_in_dim(delta, i * bq, bq, axis=3)
            w_q = None if w_idx is None else jax.lax.dynamic_slice_in_dim(w_idx, i * bq, bq, axis=1)
            mask = _block_mask(seg_q, seg_k, i * bq, j * bk, bq, bk, window, shared, w_q, w_k)[:, None, None]
            p = jnp.where(mask, jnp.exp(_scores(q_blk, k_blk, scale) - lse_blk[..., None]), 0.0)  # (B,K,G,bq,bk)
            dv = dv + jnp.einsum("bkgqt,bqkgd->btkd", p.astype(do_blk.dtype), do_blk,
                                 preferred_element_type=jnp.float32)
            dp = jnp.einsum("bqkgd,btkd->bkgqt", do_blk, v_blk, preferred_element_type=jnp.float32)
            ds = p * (dp - delta_blk[..., None]) * scale
            dk = dk + jnp.einsum("bkgqt,bqkgd->btkd", ds.astype(q_blk.dtype), q_blk,
                                 preferred_element_type=jnp.float32)
            dq_blk = jnp.einsum("bkgqt,btkd->bqkgd", ds.astype(k_blk.dtype), k_blk, preferred_element_type=jnp.float32)
            dq = jax.lax.dynamic_update_slice_in_dim(
                dq, jax.lax.dynamic_slice_in_dim(dq, i * bq, bq, axis=1) + dq_blk, i * bq, axis=1)
            return dq, dk, dv

        lo, hi = _query_block_range(j, bq, bk, nq, block_window)
        hi = jnp.minimum(hi, last_query_block[j])
        zeros = jnp.zeros((b, bk, kv, dh), jnp.float32)
        dq, dk, dv = jax.lax.fori_loop(lo, hi, body, (dq, zeros, zeros))
        return dq, (dk, dv)

    dq, (dk_N, dv_N) = jax.lax.scan(k_block, jnp.zeros(q.shape, jnp.float32), jnp.arange(nk))
    dk = jnp.moveaxis(dk_N, 0, 1).reshape(b, s, kv, dh)
    dv = jnp.moveaxis(dv_N, 0, 1).reshape(b, s, kv, dh)
    d_sinks = None
    if sinks is not None:  # the sink's value is 0: d sink = p_sink * (0 - D) summed over the rows
        d_sinks = -jnp.sum(jnp.exp(sinks[None, :, :, None] - lse) * delta, axis=(0, 3))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), d_sinks


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _chunked_core(q, k, v, seg, sinks, window, bq, bk, shared=False):
    return _chunked_fwd_impl(q, k, v, seg, sinks, window, bq, bk, shared)[0]


def _chunked_core_fwd(q, k, v, seg, sinks, window, bq, bk, shared=False):
    out, lse = _chunked_fwd_impl(q, k, v, seg, sinks, window, bq, bk, shared)
    return out, (q, k, v, seg, sinks, out, lse)


def _chunked_core_bwd(window, bq, bk, shared, res, d_out):
    q, k, v, seg, sinks, out, lse = res
    dq, dk, dv, d_sinks = _chunked_bwd_impl(q, k, v, seg, sinks, out, lse, d_out, window, bq, bk, shared)
    return dq, dk, dv, None, d_sinks


_chunked_core.defvjp(_chunked_core_fwd, _chunked_core_bwd)


def chunked_attention(q_BxSxHxDh, k_BxSxKxDh, v_BxSxKxDh, segment_ids_BxS, sliding_window: int | None = None,
                      block_size: int = 512, sinks_H=None, shared: bool = False):
    """Memory-efficient causal self-attention (see the module docstring). Any length: the sequence is padded to
    a multiple of the block (padding is segment 0, masked) and cut back."""
    b, s, h, dh = q_BxSxHxDh.shape
    kv = k_BxSxKxDh.shape[2]
    blk = min(block_size, max(8, -(-s // 8) * 8))
    pad = -s % blk
    pad_seq = lambda x: jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    q = pad_seq(q_BxSxHxDh).reshape(b, s + pad, kv, h // kv, dh)
    seg = pad_seq(jnp.asarray(segment_ids_BxS, jnp.int32))
    sinks = None if sinks_H is None else sinks_H.astype(jnp.float32).reshape(kv, h // kv)
    out = _chunked_core(q, pad_seq(k_BxSxKxDh), pad_seq(v_BxSxKxDh), seg, sinks, sliding_window, blk, blk, shared)
    return out.reshape(b, s + pad, h, dh)[:, :s]


# ------------------------------------------------------------------------------------------------ cudnn

def cudnn_attention(q_BxSxHxDh, k_BxSxKxDh, v_BxSxKxDh, segment_ids_BxS, sliding_window: int | None = None,
                    block_size: int = 512, fused_impl: str = "cudnn", shared: bool = False):
    """cuDNN's fused attention where each row is one segment then padding; `chunked` for packed rows.
    `fused_impl="xla"` runs the same call through `jax.nn.dot_product_attention`'s XLA path (tests on CPU: the
    segment-ids-to-lengths conversion, the window and the packed-row branch are this function's, not cuDNN's)."""
    seg = jnp.asarray(segment_ids_BxS, jnp.int32)
    lengths_B = jnp.sum((seg > 0).astype(jnp.int32), axis=1)
    # One segment per row, starting at 0, then padding: the only layout cuDNN's lengths can express.
    simple = jnp.all((seg == jnp.where(jnp.arange(seg.shape[1])[None] < lengths_B[:, None], 1, 0))
                     | (jnp.max(seg, axis=1, keepdims=True) == 0))

    def fused(q, k, v):
        window = None if sliding_window is None else (sliding_window - 1, 0)
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, query_seq_lengths=lengths_B,
                                            key_value_seq_lengths=lengths_B, local_window_size=window,
                                            implementation=fused_impl)

    def fallback(q, k, v):
        return chunked_attention(q, k, v, seg, sliding_window, block_size, shared=shared)

    return jax.lax.cond(simple, fused, fallback, q_BxSxHxDh, k_BxSxKxDh, v_BxSxKxDh)


# ------------------------------------------------------------------------------------------------ choice

def resolve_impl(impl: str, dtype: str, head_dim: int, backend: str | None = None, seq_len: int | None = None,
                 block_size: int = 512, sinks: bool = False) -> tuple[str, str]:
    """(path, why). `auto`: splash on TPU, cuDNN on GPU where its limits allow; on CPU `xla` for rows of at most
    one attention block (`seq_len <= block_size`), else `chunked`. With one block, `chunked` computes the same
    S x T scores and skips nothing, and on the 2-core CPU machine `xla` ran attention's fwd+bwd 1.7x to 2.3x faster
    at 128 to 512 tokens (docs/performance.md); beyond one block `chunked` skips the causally masked blocks and
    keeps memory linear. Elsewhere `xla` is never chosen automatically, since its S^2 scores do not fit long
    sequences (4k-token pairs ran out of memory on an H200). `seq_len` None (not known): `chunked`. With
    `sinks` (a model with attention sinks) `cudnn`, which has none, is refused when named and passed over by
    `auto` (chunked instead)."""
    backend = backend or mesh_context.target_platform()  # plan_pod compiles for TPU from a CPU host
    if sinks and impl == "cudnn":
        raise ConfigError("model.attention_impl=cudnn: cuDNN's fused attention (jax.nn.dot_product_attention) has "
                          "no attention sinks, and this model has them (gpt_oss); use auto, chunked, xla or splash")
    if impl != "auto":
        if impl == "cudnn" and backend != "gpu":
            return "chunked", f"cudnn needs a GPU (backend is {backend}); using chunked"
        if impl == "splash" and backend == "gpu":
            return "chunked", "splash is a TPU kernel (backend is gpu); using chunked"
        if impl == "splash" and backend != "tpu":
            return impl, f"set in the config; Pallas interpret mode on {backend} (exact, slow: for tests)"
        if impl == "cudnn" and (dtype not in ("bfloat16", "float16") or head_dim > 256):
            return "chunked", f"cudnn needs bf16/fp16 and head_dim <= 256 (dtype {dtype}, head_dim {head_dim})"
        return impl, "set in the config"
    if backend == "tpu":
        return "splash", "the Pallas TPU kernel (block-sparse causal/window mask, segment ids)"
    if backend == "gpu" and sinks:
        return "chunked", "GPU, attention sinks: cuDNN's fused attention has none, the memory-efficient JAX path does"
    if backend == "gpu" and dtype in ("bfloat16", "float16") and head_dim <= 256 and head_dim % 8 == 0:
        return "cudnn", "GPU with bf16/fp16 and head_dim <= 256 (packed rows fall back to chunked at run time)"
    if backend == "cpu" and seq_len is not None and seq_len <= block_size:
        return "xla", f"cpu, rows of {seq_len} <= attention_block_size {block_size} tokens: one block, the plain path"
    if backend == "cpu":
        return "chunked", (f"memory-efficient pure-JAX attention on cpu (blocks of {chunk_block(block_size, backend)})"
                           f" for rows over attention_block_size {block_size} tokens; xla for rows up to it")
    return "chunked", f"memory-efficient pure-JAX attention on {backend} (dtype {dtype})"


def chunk_block(block_size: int, backend: str | None = None) -> int:
    """The `chunked` kernel's block: `attention_block_size`, at most `CPU_CHUNK_BLOCK` on CPU (where `block_size`
    still decides which rows take `xla`). Smaller blocks skip more of the causal and packed rows' masked pairs, and
    on CPU cost little per block."""
    backend = backend or mesh_context.target_platform()
    return min(block_size, CPU_CHUNK_BLOCK) if backend == "cpu" else block_size


def self_attention(q_BxSxHxDh, k_BxSxKxDh, v_BxSxKxDh, segment_ids_BxS, *, sliding_window: int | None = None,
                   implementation: str = "auto", block_size: int = 512, dtype: str = "float32", sinks_H=None,
                   shared: bool = False):
    """Causal self-attention over a whole sequence (training and scoring; decoding with a cache uses `xla`).
    `sinks_H`: the attention sinks (one logit per query head), or None. `shared`: the segment ids may hold
    shared-prompt units (`segments.visible`)."""
    impl, _ = resolve_impl(implementation, dtype, q_BxSxHxDh.shape[-1], seq_len=q_BxSxHxDh.shape[1],
                           block_size=block_size, sinks=sinks_H is not None)
    qkv = (q_BxSxHxDh, k_BxSxKxDh, v_BxSxKxDh)
    if impl == "xla":
        return xla_attention(*qkv, mask_BxSxT(segment_ids_BxS, sliding_window, shared=shared), sinks_H)
    if impl == "splash":
        return splash.splash_attention(*qkv, segment_ids_BxS, sliding_window, block_size, sinks_H=sinks_H)
    if impl == "cudnn":  # (resolve_impl never gives cudnn with sinks)
        return cudnn_attention(*qkv, segment_ids_BxS, sliding_window, block_size, shared=shared)
    return chunked_attention(*qkv, segment_ids_BxS, sliding_window, chunk_block(block_size), sinks_H, shared)
