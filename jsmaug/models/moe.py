"""Sparse mixture-of-experts: routing and the expert feed-forward, with several dispatch paths (Mixtral,
Qwen3-MoE and OLMoE share them: SwiGLU experts, top-k softmax routing).

All paths compute, for every token t with chosen experts e_1..e_k and weights g_1..g_k,
    y_t = sum_j g_j * w2[e_j]( silu(w1[e_j] x_t) * w3[e_j] x_t )
and differ only in how tokens reach their experts:

- "dense":    every expert on every token, masked by the combine weights. E/k times the useful FLOPs;
              the reference the others are tested against.
- "ragged":   sort the (token, expert) assignments by expert and run `jax.lax.ragged_dot`. Dropless. XLA lowers
              it to a masked dense product on CPU and GPU (E x the FLOPs), and on TPU to a grouped-matmul kernel
              except for the weight gradient (dense per expert), so "auto" picks it nowhere.
- "megablox": "ragged" with the Pallas TPU grouped-matmul kernels (gmm/tgmm) instead of `ragged_dot`: work in
              proportion to the rows really routed, in the weight gradient too (jsmaug/models/grouped_matmul.py). The
              TPU default; off TPU it runs in Pallas interpret mode (tests only).
- "bucketed": sort by expert into an (E, C, D) buffer whose capacity C is the smallest of a few static sizes
              (1.125x, 1.25x, ... the mean load, up to T) that holds the busiest expert: `lax.switch` picks the
              compiled branch at run time. Dropless, one batched matmul per weight, a hand-written VJP.
              The CPU default: as fast as one dense matmul of the same useful FLOPs (tools/bench.py).
- "blocked":  sort assignments by expert, pad each expert's group to a multiple of `block_size` rows, and run
              one (block_size x hidden) @ (hidden x mlp) matmul per block with that block's expert weights, in a
              `lax.scan`. Dropless; wastes at most block_size-1 rows per expert, whatever the imbalance.
- "capacity": sort by expert, keep at most C = ceil(capacity_factor * T * k / E) rows per expert, drop the rest
              (counted). Classic Switch-style; fixed shapes, not dropless.

Array names carry their shapes: T tokens, D hidden, F mlp (intermediate), E experts, K experts per token.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from jsmaug.models import grouped_matmul
from jsmaug.parallel import mesh_context


def route(router_logits_TxE: jax.Array, k: int, renormalize: bool = True):
    """HF's top-k routing: float32 softmax over experts, top-k, and (Mixtral always; Qwen3-MoE and OLMoE per
    `norm_topk_prob`) the k weights renormalised to sum to 1; otherwise they stay softmax probabilities.

    Returns (probs_TxE float32, topk_idx_TxK int32, topk_weight_TxK float32).
    """
    probs_TxE = jax.nn.softmax(router_logits_TxE.astype(jnp.float32), axis=-1)
    topk_w_TxK, topk_idx_TxK = jax.lax.top_k(probs_TxE, k)
    if renormalize:
        topk_w_TxK = topk_w_TxK / jnp.sum(topk_w_TxK, axis=-1, keepdims=True)
    return probs_TxE, topk_idx_TxK.astype(jnp.int32), topk_w_TxK


def _swiglu(x, w1, w3, w2, dtype):
    h = jax.nn.silu(x @ w1.astype(dtype)) * (x @ w3.astype(dtype))
    return h @ w2.astype(dtype)


def dense_ffn(x_TxD, idx_TxK, w_TxK, w1_ExDxF, w3_ExDxF, w2_ExFxD):
    """Every expert on every token (reference path)."""
    dtype = x_TxD.dtype
    num_experts = w1_ExDxF.shape[0]
    combine_TxE = jnp.sum(jax.nn.one_hot(idx_TxK, num_experts, dtype=jnp.float32) * w_TxK[..., None], axis=1)
    h_TxExF = jax.nn.silu(jnp.einsum("td,edf->tef", x_TxD, w1_ExDxF.astype(dtype))) * jnp.einsum(
        "td,edf->tef", x_TxD, w3_ExDxF.astype(dtype))
    y_TxExD = jnp.einsum("tef,efd->ted", h_TxExF, w2_ExFxD.astype(dtype))
    return jnp.einsum("ted,te->td", y_TxExD, combine_TxE.astype(dtype)), jnp.zeros((), jnp.int32)


def _sort_assignments(idx_TxK, num_experts):
    """Flattens (token, slot) assignments and sorts them by expert (stable, so token order is kept).

    Returns (order_A, token_A, expert_A, group_sizes_E, rank_A): for each sorted assignment, its position in
    the token-major order, its token, its expert and its rank within that expert's group."""
    num_tokens, k = idx_TxK.shape
    expert_A = idx_TxK.reshape(-1)  # A = T*K assignments, token-major
    order_A = jnp.argsort(expert_A, stable=True)
    token_A = (order_A // k).astype(jnp.int32)  # which token each sorted assignment belongs to
    group_sizes_E = jnp.bincount(expert_A, length=num_experts).astype(jnp.int32)
    expert_A = expert_A[order_A]
    starts_E = jnp.cumsum(group_sizes_E) - group_sizes_E
    rank_A = jnp.arange(num_tokens * k, dtype=jnp.int32) - starts_E[expert_A]
    return order_A, token_A, expert_A, group_sizes_E, rank_A


def _combine(y_AxD, order_A, token_A, w_TxK, num_tokens):
    weight_A = w_TxK.reshape(-1)[order_A].astype(y_AxD.dtype)
    out = jnp.zeros((num_tokens, y_AxD.shape[-1]), y_AxD.dtype)
    return out.at[token_A].add(y_AxD * weight_A[:, None])


def grouped_swiglu(xs_AxD, w1_ExDxF, w3_ExDxF, w2_ExFxD, group_sizes_E, impl: str = "ragged",
                   all_rows_grouped: bool = False):
    """The expert feed-forward on rows sorted by expert (jsmaug/models/grouped_matmul.py); rows past the groups give 0."""
    gmm = functools.partial(grouped_matmul.grouped_matmul, group_sizes_G=group_sizes_E, impl=impl,
                            all_rows_grouped=all_rows_grouped)
    h_AxF = jax.nn.silu(gmm(xs_AxD, w1_ExDxF)) * gmm(xs_AxD, w3_ExDxF)
    return gmm(h_AxF, w2_ExFxD)


def ragged_ffn(x_TxD, idx_TxK, w_TxK, w1_ExDxF, w3_ExDxF, w2_ExFxD, impl: str = "ragged"):
    """Sorted grouped matmul (dropless): `jax.lax.ragged_dot` or the megablox kernels."""
    order_A, token_A, _, group_sizes_E, _ = _sort_assignments(idx_TxK, w1_ExDxF.shape[0])
    y_AxD = grouped_swiglu(x_TxD[token_A], w1_ExDxF, w3_ExDxF, w2_ExFxD, group_sizes_E, impl, all_rows_grouped=True)
    return _combine(y_AxD, order_A, token_A, w_TxK, x_TxD.shape[0]), jnp.zeros((), jnp.int32)


def blocked_ffn(x_TxD, idx_TxK, w_TxK, w1_ExDxF, w3_ExDxF, w2_ExFxD, block_size: int = 128):
    """Sorted, block-padded grouped matmul (dropless): one expert per block of `block_size` rows."""
    dtype = x_TxD.dtype
    num_tokens, k = idx_TxK.shape
    num_experts = w1_ExDxF.shape[0]
    num_assign = num_tokens * k
    bs = int(min(block_size, max(8, 1 << (num_assign - 1).bit_length())))  # no bigger than needed
    order_A, token_A, expert_A, group_sizes_E, rank_A = _sort_assignments(idx_TxK, num_experts)

    # Each expert's group starts on a block boundary of the padded buffer.
    padded_sizes_E = (group_sizes_E + bs - 1) // bs * bs
    padded_ends_E = jnp.cumsum(padded_sizes_E)
    padded_starts_E = padded_ends_E - padded_sizes_E
    dest_A = padded_starts_E[expert_A] + rank_A

    num_blocks = math.ceil(num_assign / bs) + num_experts  # static bound on sum_e ceil(g_e / bs)
    rows = num_blocks * bs
    xs_RxD = jnp.zeros((rows, x_TxD.shape[1]), dtype).at[dest_A].set(x_TxD[token_A])
    block_expert_M = jnp.minimum(
        jnp.searchsorted(padded_ends_E, jnp.arange(num_blocks) * bs, side="right"), num_experts - 1).astype(jnp.int32)
    used_blocks = padded_ends_E[-1] // bs

    w1c, w3c, w2c = (w.astype(dtype) for w in (w1_ExDxF, w3_ExDxF, w2_ExFxD))

    def one_block(_, inp):
        m, e, xb_BxD = inp

        def compute(xb):
            return _swiglu(xb, w1c[e], w3c[e], w2c[e], dtype)

        # Blocks past the last used one hold only padding: skip their matmuls.
        yb = jax.lax.cond(m < used_blocks, compute, jnp.zeros_like, xb_BxD)
        return None, yb

    _, ys_MxBxD = jax.lax.scan(
        one_block, None, (jnp.arange(num_blocks), block_expert_M, xs_RxD.reshape(num_blocks, bs, -1)))
    y_AxD = ys_MxBxD.reshape(rows, -1)[dest_A]
    return _combine(y_AxD, order_A, token_A, w_TxK, num_tokens), jnp.zeros((), jnp.int32)


def capacity_ffn(x_TxD, idx_TxK, w_TxK, w1_ExDxF, w3_ExDxF, w2_ExFxD, capacity_factor: float = 1.25):
    """Capacity-factor dispatch: at most C rows per expert; overflowing assignments are dropped and counted.

    Earlier tokens win (assignments are kept in token order within each expert).
    """
    dtype = x_TxD.dtype
    num_tokens, k = idx_TxK.shape
    num_experts = w1_ExDxF.shape[0]
    capacity = max(1, math.ceil(capacity_factor * num_tokens * k / num_experts))
    order_A, token_A, expert_A, _, rank_A = _sort_assignments(idx_TxK, num_experts)
    keep_A = rank_A < capacity
    # Dropped assignments write to a scratch slot (index `capacity`) that is cut off afterwards.
    slot_A = jnp.where(keep_A, rank_A, capacity)
    buf_ExCxD = jnp.zeros((num_experts, capacity + 1, x_TxD.shape[1]), dtype)
    buf_ExCxD = buf_ExCxD.at[expert_A, slot_A].set(x_TxD[token_A])[:, :capacity]
    out_ExCxD, _, _ = _expert_matmuls(buf_ExCxD, *(w.astype(dtype) for w in (w1_ExDxF, w3_ExDxF, w2_ExFxD)))
    out_ExCxD = jnp.pad(out_ExCxD, ((0, 0), (0, 1), (0, 0)))  # scratch slot reads back zeros
    y_AxD = out_ExCxD[expert_A, slot_A]
    dropped = jnp.sum(~keep_A).astype(jnp.int32)
    return _combine(y_AxD, order_A, token_A, w_TxK, num_tokens), dropped


def _expert_matmuls(xb_ExCxD, w1, w3, w2):
    """SwiGLU of every expert on its (C, D) rows: (output (E, C, D), pre-activations p1, p3 (E, C, F))."""
    p1_ExCxF = jnp.einsum("ecd,edf->ecf", xb_ExCxD, w1)
    p3_ExCxF = jnp.einsum("ecd,edf->ecf", xb_ExCxD, w3)
    return jnp.einsum("ecf,efd->ecd", jax.nn.silu(p1_ExCxF) * p3_ExCxF, w2), p1_ExCxF, p3_ExCxF


# bucketed's ladder of capacities, in multiples of the mean load. Measured on 64 experts of width 192 at hidden
# 512, top-8, 2,048 tokens (jsmaug/perf/moe_bench.py --ladder, 2-core CPU, 2026-12-02): a branch costs the same
# from 1.0x to 1.25x the mean (726-730 ms fwd+bwd) and grows linearly beyond (1.5x 859, 2x 1071, 3x 1754, 8x =
# every token 5348 ms), and a random router's busiest expert is 1.17x the mean, so finer low rungs save nothing;
# but with many experts the jump from 3x to all tokens was 3x the cost (with 128 experts 5x): a router whose
# busiest expert held 3.7x the mean took 6.9 s with rungs up to 3x and 3.4 s with 4x and 6x added, and the
# added branches cost nothing measurable with balanced routing (1064-1127 ms either way). The 1.75x and 2.5x rungs:
# the 29.8M step model's random-init routers put 1.36x, 1.70x, 1.87x and 2.1x the mean on their layers' busiest
# experts, which ran the 1.5x, 2x, 2x and 3x branches; with 1.75x and 2.5x added the DPOP step took 1160 ms
# against 1249 ms (0.93x; timed alternately in one process, 2026-12-02); rungs every 0.125x gained nothing more.
BUCKET_FACTORS = (1.125, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0, 6.0)


def bucket_capacities(num_tokens: int, k: int, num_experts: int,
                      factors: tuple[float, ...] = BUCKET_FACTORS,
                      mean: float | None = None) -> tuple[int, ...]:
    """The static per-expert capacities `bucketed_ffn` chooses from: factor x the mean load (`mean`, default
    num_tokens * k / num_experts), rounded up to a multiple of 8, and finally `num_tokens` (an expert never gets
    more rows than there are tokens; factors above num_tokens / mean add no branch, so with 8 experts top-2 the
    4x and 6x rungs are `num_tokens` itself)."""
    mean = num_tokens * k / num_experts if mean is None else mean
    caps = {min(num_tokens, -(-math.ceil(f * mean) // 8) * 8) for f in factors}
    return tuple(sorted(caps | {num_tokens}))


def bucketed_ffn(x_TxD, idx_TxK, w_TxK, w1_ExDxF, w3_ExDxF, w2_ExFxD,
                 factors: tuple[float, ...] = BUCKET_FACTORS, valid_TxK=None,
                 mean_load: float | None = None):
    """Dropless capacity dispatch: the capacity is the smallest of a few static sizes that holds the busiest
    expert (`lax.switch` over one compiled branch per size), so nothing is dropped and the expert matmuls are
    one batched (E, C, D) x (E, D, F) product. With balanced routing C is ~1.1-1.25x the mean load; its cost
    grows with the busiest expert's load (all tokens on one expert costs as much as `dense`).

    The expert part has a hand-written VJP (`_grouped_swiglu`): autodiff through `lax.switch` would make
    every branch emit the union of all branches' residuals (zero-filled (E, C_max, F) buffers), which cost
    more than the matmuls here. The residuals are per assignment instead, the same shape in every branch.

    `valid_TxK` (the all_to_all dispatch's received rows): assignments marked False belong to no expert. They
    sort last, count in no group and take no buffer slot (their scatter index is out of range, so it is dropped),
    and their output is multiplied by a combine weight the caller sets to 0. `mean_load` sets the expected
    rows per expert that the capacities are sized from (default: all assignments spread evenly)."""
    dtype = x_TxD.dtype
    num_tokens, k = idx_TxK.shape
    num_experts = w1_ExDxF.shape[0]
    caps = bucket_capacities(num_tokens, k, num_experts, factors, mean_load)
    if valid_TxK is not None:
        idx_TxK = jnp.where(valid_TxK, idx_TxK, num_experts)
    order_A, token_A, expert_A, group_sizes_E, slot_A = _sort_assignments(idx_TxK, num_experts)
    if valid_TxK is not None:
        slot_A = jnp.where(expert_A < num_experts, slot_A, caps[-1])  # out of every buffer: dropped
    branch = jnp.searchsorted(jnp.asarray(caps), jnp.max(group_sizes_E), side="left").astype(jnp.int32)
    y_AxD = _grouped_swiglu(caps, x_TxD, w1_ExDxF.astype(dtype), w3_ExDxF.astype(dtype), w2_ExFxD.astype(dtype),
                            token_A, expert_A, slot_A, branch)
    return _combine(y_AxD, order_A, token_A, w_TxK, num_tokens), jnp.zeros((), jnp.int32)


def _to_buffer(v_AxN, expert_A, slot_A, num_experts: int, capacity: int):
    buf = jnp.zeros((num_experts, capacity, v_AxN.shape[-1]), v_AxN.dtype)
    return buf.at[expert_A, slot_A].set(v_AxN, unique_indices=True)


def _grouped_forward(capacity, x_TxD, w1, w3, w2, token_A, expert_A, slot_A):
    """y per assignment, and the two pre-activations per assignment (the backward's residuals)."""
    xb_ExCxD = _to_buffer(x_TxD[token_A], expert_A, slot_A, w1.shape[0], capacity)
    out_ExCxD, p1_ExCxF, p3_ExCxF = _expert_matmuls(xb_ExCxD, w1, w3, w2)
    return out_ExCxD[expert_A, slot_A], p1_ExCxF[expert_A, slot_A], p3_ExCxF[expert_A, slot_A]


def _grouped_backward(capacity, x_TxD, w1, w3, w2, token_A, expert_A, slot_A, p1_AxF, p3_AxF, g_AxD):
    num_experts = w1.shape[0]
    buf = lambda v: _to_buffer(v, expert_A, slot_A, num_experts, capacity)  # padding rows are zeros
    xb, p1, p3, dout = buf(x_TxD[token_A]), buf(p1_AxF), buf(p3_AxF), buf(g_AxD)
    sig = jax.nn.sigmoid(p1)
    s1 = p1 * sig
    h = s1 * p3
    dw2 = jnp.einsum("ecf,ecd->efd", h, dout)
    dh = jnp.einsum("ecd,efd->ecf", dout, w2)
    dp1 = dh * p3 * (sig * (1 + p1 * (1 - sig)))  # d silu(z) / dz = sig(z) (1 + z (1 - sig(z)))
    dp3 = dh * s1
    dxb = jnp.einsum("ecf,edf->ecd", dp1, w1) + jnp.einsum("ecf,edf->ecd", dp3, w3)
    dw1 = jnp.einsum("ecd,ecf->edf", xb, dp1)
    dw3 = jnp.einsum("ecd,ecf->edf", xb, dp3)
    dx = jnp.zeros_like(x_TxD).at[token_A].add(dxb[expert_A, slot_A])
    return dx, dw1, dw3, dw2


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _grouped_swiglu(caps, x_TxD, w1, w3, w2, token_A, expert_A, slot_A, branch):
    """SwiGLU experts on the sorted assignments, capacity caps[branch] (the smallest that holds every group)."""
    return _grouped_swiglu_fwd(caps, x_TxD, w1, w3, w2, token_A, expert_A, slot_A, branch)[0]


def _grouped_swiglu_fwd(caps, x_TxD, w1, w3, w2, token_A, expert_A, slot_A, branch):
    branches = [functools.partial(_grouped_forward, c) for c in caps]
    y, p1, p3 = jax.lax.switch(branch, branches, x_TxD, w1, w3, w2, token_A, expert_A, slot_A)
    return y, (x_TxD, w1, w3, w2, token_A, expert_A, slot_A, branch, p1, p3)


def _grouped_swiglu_bwd(caps, res, g_AxD):
    x_TxD, w1, w3, w2, token_A, expert_A, slot_A, branch, p1, p3 = res
    branches = [functools.partial(_grouped_backward, c) for c in caps]
    dx, dw1, dw3, dw2 = jax.lax.switch(branch, branches, x_TxD, w1, w3, w2, token_A, expert_A, slot_A, p1, p3,
                                       g_AxD)
    return dx, dw1, dw3, dw2, None, None, None, None


_grouped_swiglu.defvjp(_grouped_swiglu_fwd, _grouped_swiglu_bwd)


def resolve_impl(impl: str, backend: str | None = None) -> str:
    """'auto' -> 'megablox' on TPU, 'bucketed' elsewhere; `backend` defaults to the compile target's platform.

    Chosen from measurements: on CPU `ragged_dot` is a masked dense product (bucketed 6.7x faster, tools/bench.py
    on the 2-core CPU machine); on GPU XLA lowers it to a dense fallback too (one H200, jax 0.11.2, MoE layer
    fwd+bwd: bucketed 461 useful TFLOP/s against ragged 86; the DPOP step 0.353 s against 0.970 s). On TPU,
    `ragged_dot`'s weight gradient compiles to a masked dense product per expert over every row (tools/plan_pod.py
    --save_hlo on v5p-128; docs/gpu-tpu.md), so TPU takes the megablox kernels."""
    if impl != "auto":
        return impl
    return "megablox" if (backend or mesh_context.target_platform()) == "tpu" else "bucketed"


def expert_ffn(x_TxD, idx_TxK, w_TxK, w1_ExDxF, w3_ExDxF, w2_ExFxD, *, impl: str = "auto",
               block_size: int = 128, capacity_factor: float = 1.25):
    """Dispatches to the chosen path. Returns (y_TxD, number of dropped assignments)."""
    impl = resolve_impl(impl)
    args = (x_TxD, idx_TxK, w_TxK, w1_ExDxF, w3_ExDxF, w2_ExFxD)
    if impl == "dense":
        return dense_ffn(*args)
    if impl in grouped_matmul.IMPLS:
        return ragged_ffn(*args, impl=impl)
    if impl == "blocked":
        return blocked_ffn(*args, block_size=block_size)
    if impl == "capacity":
        return capacity_ffn(*args, capacity_factor=capacity_factor)
    if impl == "bucketed":
        return bucketed_ffn(*args)
    raise ValueError(f"unknown moe_impl {impl!r}")


def load_balancing_loss(counts_E, prob_sums_E, num_rows, num_experts: int):
    """HF's `load_balancing_loss_func` from accumulated statistics.

    counts_E: top-k assignments per expert summed over all layers' (unpadded) tokens;
    prob_sums_E: router probabilities per expert summed likewise; num_rows: layers x unpadded tokens.
    aux = E * sum_e (counts_e / N) * (prob_sums_e / N); equals k under perfectly even routing.
    """
    n = jnp.maximum(num_rows, 1.0)
    return num_experts * jnp.sum((counts_E / n) * (prob_sums_E / n))
