"""Segment ids, the one contract between packed rows (jsmaug/data/packing.py) and the attention mask
(jsmaug/models/attention.py): 0 is padding; ids 1 .. SHARED - 1 are ordinary segments, each attending only to
itself; a pair laid out with its prompt shared (`data.share_prompt`) carries `shared_id(u, b)`: its unit u in the
row, b = PROMPT for the prompt, CHOSEN / REJECTED for the branches, each branch also attending to its unit's
prompt (`visible`). The rules on them live here, for the attention kernels: `visible` (who sees whom), `window_index`
(what a sliding window measures by) and `segment_bounds` (each segment's span)."""

import jax
import jax.numpy as jnp

SHARED = 1 << 24
PROMPT, CHOSEN, REJECTED = 0, 1, 2


def shared_id(unit: int, branch: int) -> int:
    return SHARED + 4 * unit + branch


def visible(seg_q, seg_k):
    """Segment ids' part of the mask (broadcast): the same segment, or the key in the prompt of the query's unit."""
    prompt_of_unit = (seg_k >= SHARED) & ((seg_k & 3) == PROMPT) & ((seg_q >> 2) == (seg_k >> 2))
    return ((seg_q == seg_k) | prompt_of_unit) & (seg_k > 0)


def run_starts(ids_BxS):
    """Per position, where the run of its id (consecutive positions holding one id) starts in the row."""
    idx = jnp.broadcast_to(jnp.arange(ids_BxS.shape[1], dtype=jnp.int32), ids_BxS.shape)
    prev = jnp.pad(ids_BxS[:, :-1], ((0, 0), (1, 0)), constant_values=-1)
    return jax.lax.cummax(jnp.where(ids_BxS != prev, idx, 0), axis=1)


def segment_bounds(seg_BxS):
    """Per position, where its segment starts and ends (exclusive); a padding position (segment 0) is its own
    span. Segments are contiguous runs of one id, as packing lays them out."""
    s = seg_BxS.shape[1]
    idx = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), seg_BxS.shape)
    nxt = jnp.pad(seg_BxS[:, 1:], ((0, 0), (0, 1)), constant_values=-1)
    start = run_starts(seg_BxS)
    end = jax.lax.cummin(jnp.where(seg_BxS != nxt, idx + 1, s), axis=1, reverse=True)
    pad = seg_BxS == 0
    return jnp.where(pad, idx, start), jnp.where(pad, idx + 1, end)


def window_index(seg_BxS):
    """Per position, the index a sliding window measures distances by (shared prompts): its index in the row, less
    its unit's chosen branch's length where it is in the rejected branch, which the chosen branch separates from
    the prompt. A branch's distance to its prompt is then its position's, as in the pair's own sequence; between
    two positions of one branch, or of one ordinary segment, it is the row's."""
    idx = jnp.broadcast_to(jnp.arange(seg_BxS.shape[1], dtype=jnp.int32), seg_BxS.shape)
    start, _ = segment_bounds(seg_BxS)
    before = jnp.maximum(start - 1, 0)  # the last position of the run before this one
    after_chosen = (jnp.take_along_axis(seg_BxS, before, axis=1) == seg_BxS - (REJECTED - CHOSEN)) & (start > 0)
    rejected = (seg_BxS >= SHARED) & ((seg_BxS & 3) == REJECTED) & after_chosen
    return idx - jnp.where(rejected, start - jnp.take_along_axis(start, before, axis=1), 0)
