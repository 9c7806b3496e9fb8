"""Sparse mixture-of-experts: routing and the expert feed-forward, with several dispatch paths (Mixtral,
Qwen3-MoE and OLMoE share them: SwiGLU experts, top-k softmax routing).

All paths compute, for every token t with chosen experts e_1..e_k and weights g_1..g_k,
    y_t = sum_j g_j * w2[e_j]( silu(w1[e_j] x_t) * w3[e_j] x_t )
(gpt-oss: biases on both pre-activations and its clamped SwiGLU, jsmaug/models/glu.py; LoRA: weights that are
`factored.Factored`) and differ only in how tokens reach their experts:

- "dense":    every expert on every token, masked by the combine weights. E/k times the useful FLOPs;
              the reference the others are tested against.
- "ragged":   sort the (token, expert) assignments by expert and run `jax.lax.ragged_dot`. Dropless. XLA lowers
              it to a masked dense product on CPU and GPU (E x the FLOPs), and on TPU to a grouped-matmul kernel
              except for the weight gradient (dense per expert), so "auto" picks it nowhere.
- "megablox": "ragged" with the Pallas TPU grouped-matmul kernels (gmm/tgmm) instead of `ragged_dot`: work in
              proportion to the rows really routed, in the weight gradient too (jsmaug/models/grouped_matmul.py). The
              TPU default; off TPU it runs in Pallas interpret mode (tests only).
- "bucketed": sort by expert; each expert's first C rows (C the mean load) into an (E, C, D) buffer, one
              batched matmul per weight, and the busier experts' rows beyond C into overflow blocks of one
              expert each, as many as the routing needs (`lax.switch` over a ladder of block counts).
              Dropless, fixed shapes, a hand-written VJP (jsmaug/models/bucketed.py). The CPU and GPU default.
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

from jsmaug.models import bucketed, factored, grouped_matmul
from jsmaug.models.glu import SWIGLU
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


def glu_ffn(x, w1, w3, w2, dtype, glu=SWIGLU, b13=None):
    """One expert's gated feed-forward on rows x (b13: its gate/up biases, gpt-oss)."""
    p1, p3 = x @ w1.astype(dtype), x @ w3.astype(dtype)
    if b13 is not None:
        p1, p3 = p1 + b13[0].astype(dtype), p3 + b13[1].astype(dtype)
    return glu(p1, p3) @ w2.astype(dtype)


_swiglu = glu_ffn  # the name tools/bench.py still uses


def dense_ffn(x_TxD, idx_TxK, w_TxK, w1_ExDxF, w3_ExDxF, w2_ExFxD, glu=SWIGLU, b13=None):
    """Every expert on every token (reference path)."""
    dtype = x_TxD.dtype
    num_experts = w1_ExDxF.shape[0]
    combine_TxE = jnp.sum(jax.nn.one_hot(idx_TxK, num_experts, dtype=jnp.float32) * w_TxK[..., None], axis=1)
    p1_TxExF = factored.einsum("td,edf->tef", x_TxD, w1_ExDxF.astype(dtype))
    p3_TxExF = factored.einsum("td,edf->tef", x_TxD, w3_ExDxF.astype(dtype))
    if b13 is not None:
        p1_TxExF, p3_TxExF = p1_TxExF + b13[0].astype(dtype), p3_TxExF + b13[1].astype(dtype)
    h_TxExF = glu(p1_TxExF, p3_TxExF)
    y_TxExD = factored.einsum("tef,efd->ted", h_TxExF, w2_ExFxD.astype(dtype))
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


def grouped_glu(xs_AxD, w1_ExDxF, w3_ExDxF, w2_ExFxD, group_sizes_E, impl: str = "ragged",
                all_rows_grouped: bool = False, glu=SWIGLU, b13=None):
    """The expert feed-forward on rows sorted by expert (jsmaug/models/grouped_matmul.py); rows past the groups give 0."""
    gmm = functools.partial(grouped_matmul.grouped_matmul, group_sizes_G=group_sizes_E, impl=impl,
                            all_rows_grouped=all_rows_grouped)
    p1_AxF, p3_AxF = gmm(xs_AxD, w1_ExDxF), gmm(xs_AxD, w3_ExDxF)
    if b13 is not None:  # each row's expert from the group sizes; rows past the groups take the last (masked)
        ends_E = jnp.cumsum(group_sizes_E)
        e_A = jnp.minimum(jnp.searchsorted(ends_E, jnp.arange(xs_AxD.shape[0]), side="right"), ends_E.shape[0] - 1)
        p1_AxF, p3_AxF = p1_AxF + b13[0][e_A].astype(p1_AxF.dtype), p3_AxF + b13[1][e_A].astype(p3_AxF.dtype)
    return gmm(glu(p1_AxF, p3_AxF), w2_ExFxD)


def ragged_ffn(x_TxD, idx_TxK, w_TxK, w1_ExDxF, w3_ExDxF, w2_ExFxD, impl: str = "ragged", glu=SWIGLU, b13=None):
    """Sorted grouped matmul (dropless): `jax.lax.ragged_dot` or the megablox kernels."""
    order_A, token_A, _, group_sizes_E, _ = _sort_assignments(idx_TxK, w1_ExDxF.shape[0])
    y_AxD = grouped_glu(x_TxD[token_A], w1_ExDxF, w3_ExDxF, w2_ExFxD, group_sizes_E, impl, all_rows_grouped=True,
                        glu=glu, b13=b13)
    return _combine(y_AxD, order_A, token_A, w_TxK, x_TxD.shape[0]), jnp.zeros((), jnp.int32)


def blocked_ffn(x_TxD, idx_TxK, w_TxK, w1_ExDxF, w3_ExDxF, w2_ExFxD, block_size: int = 128, glu=SWIGLU, b13=None):
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
            return glu_ffn(xb, w1c[e], w3c[e], w2c[e], dtype, glu, None if b13 is None else (b13[0][e], b13[1][e]))

        # Blocks past the last used one hold only padding: skip their matmuls.
        yb = jax.lax.cond(m < used_blocks, compute, jnp.zeros_like, xb_BxD)
        return None, yb

    _, ys_MxBxD = jax.lax.scan(
        one_block, None, (jnp.arange(num_blocks), block_expert_M, xs_RxD.reshape(num_blocks, bs, -1)))
    y_AxD = ys_MxBxD.reshape(rows, -1)[dest_A]
    return _combine(y_AxD, order_A, token_A, w_TxK, num_tokens), jnp.zeros((), jnp.int32)


def capacity_ffn(x_TxD, idx_TxK, w_TxK, w1_ExDxF, w3_ExDxF, w2_ExFxD, capacity_factor: float = 1.25, glu=SWIGLU,
                 b13=None):
    """Capacity-factor dispatch: at most C rows per expert; overflowing assignments are dropped and counted.

    Earlier tokens win (assignments are kept in token order within each expert).
    """
    dtype = x_TxD.dtype
    num_tokens, k = idx_TxK.shape
    num_experts = w1_ExDxF.shape[0]
    capacity = max(1, math.ceil(capacity_factor * num_tokens * k / num_experts))
    order_A, token_A, expert_A, _, rank_A = _sort_assignments(idx_TxK, num_experts)
    # Assignments ranked past the capacity fall outside the buffer: their scatter is dropped, their gather reads 0.
    buf_ExCxD = bucketed.to_buffer(x_TxD[token_A], expert_A, rank_A, num_experts, capacity)
    weights = (w.astype(dtype) for w in (w1_ExDxF, w3_ExDxF, w2_ExFxD))
    out_ExCxD, _, _ = bucketed.expert_matmuls("e", buf_ExCxD, *weights, glu, *(b13 or ()))
    y_AxD = bucketed.from_buffer(out_ExCxD, expert_A, rank_A)
    dropped = jnp.sum(rank_A >= capacity).astype(jnp.int32)
    return _combine(y_AxD, order_A, token_A, w_TxK, num_tokens), dropped


def bucketed_ffn(x_TxD, idx_TxK, w_TxK, w1_ExDxF, w3_ExDxF, w2_ExFxD, valid_TxK=None, mean_load: float | None = None,
                 glu=SWIGLU, b13=None, overflow: str = "auto"):
    """Dropless dispatch with fixed shapes (jsmaug/models/bucketed.py): each expert's first C rows (C the mean
    load) in one (E, C, D) buffer, the busier experts' rows beyond C in as many overflow blocks as they need.

    `valid_TxK` (the all_to_all dispatch's received rows): assignments marked False belong to no expert. They
    sort last, count in no group and take no row (their scatter index is out of range, so it is dropped), and
    their output is multiplied by a combine weight the caller sets to 0. `mean_load` sets the expected rows per
    expert that the capacity is sized from (default: all assignments spread evenly)."""
    dtype = x_TxD.dtype
    num_tokens = x_TxD.shape[0]
    num_experts = w1_ExDxF.shape[0]
    if valid_TxK is not None:
        idx_TxK = jnp.where(valid_TxK, idx_TxK, num_experts)
    order_A, token_A, expert_A, group_sizes_E, slot_A = _sort_assignments(idx_TxK, num_experts)
    y_AxD = bucketed.expert_part(x_TxD, *(w.astype(dtype) for w in (w1_ExDxF, w3_ExDxF, w2_ExFxD)),
                                 token_A, expert_A, slot_A, group_sizes_E, mean_load, glu, b13, overflow)
    return _combine(y_AxD, order_A, token_A, w_TxK, num_tokens), jnp.zeros((), jnp.int32)


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
               block_size: int = 128, capacity_factor: float = 1.25, glu=SWIGLU, b13=None, token_chunks: int = 1):
    """Dispatches to the chosen path. Returns (y_TxD, number of dropped assignments). `glu`: the gated activation
    (jsmaug/models/glu.py); `b13`: None or the (E, F) biases of the gate and up pre-activations (gpt-oss; the
    down projection's bias is the caller's, `SparseMoE`). Weights may be `factored.Factored` (LoRA).

    `token_chunks` > 1 runs the tokens in that many equal chunks, one after another (`lax.map`), each chunk
    rematerialised (`jax.checkpoint`): the backward holds one chunk's expert intermediates (the gate, up and
    activation rows and their gradients, each assignments x F) instead of all of them, for a second forward of
    the experts. The weights are shared by the chunks (gathered once). Capacity-path drops are per chunk. The
    count used is the largest divisor of the layer's token count up to `token_chunks` (a decoding step's few
    tokens run in one pass)."""
    kw = dict(impl=impl, block_size=block_size, capacity_factor=capacity_factor, glu=glu)
    num_tokens = x_TxD.shape[0]
    token_chunks = max(c for c in range(1, token_chunks + 1) if num_tokens % c == 0)
    if token_chunks > 1:
        chunk = lambda v: v.reshape(token_chunks, num_tokens // token_chunks, *v.shape[1:])  # noqa: E731

        @jax.checkpoint
        def one(args):
            return expert_ffn(*args, w1_ExDxF, w3_ExDxF, w2_ExFxD, b13=b13, **kw)

        y_CxTxD, dropped_C = jax.lax.map(one, (chunk(x_TxD), chunk(idx_TxK), chunk(w_TxK)))
        return y_CxTxD.reshape(x_TxD.shape), jnp.sum(dropped_C)
    impl = resolve_impl(impl)
    args = (x_TxD, idx_TxK, w_TxK, w1_ExDxF, w3_ExDxF, w2_ExFxD)
    act = dict(glu=glu, b13=b13)
    if impl == "dense":
        return dense_ffn(*args, **act)
    if impl in grouped_matmul.IMPLS:
        return ragged_ffn(*args, impl=impl, **act)
    if impl == "blocked":
        return blocked_ffn(*args, block_size=block_size, **act)
    if impl == "capacity":
        return capacity_ffn(*args, capacity_factor=capacity_factor, **act)
    if impl == "bucketed":
        return bucketed_ffn(*args, **act)
    raise ValueError(f"unknown moe_impl {impl!r}")


def load_balancing_loss(counts_E, prob_sums_E, num_rows, num_experts: int):
    """HF's `load_balancing_loss_func` from accumulated statistics.

    counts_E: top-k assignments per expert summed over all layers' (unpadded) tokens;
    prob_sums_E: router probabilities per expert summed likewise; num_rows: layers x unpadded tokens.
    aux = E * sum_e (counts_e / N) * (prob_sums_e / N); equals k under perfectly even routing.
    """
    n = jnp.maximum(num_rows, 1.0)
    return num_experts * jnp.sum((counts_E / n) * (prob_sums_E / n))
