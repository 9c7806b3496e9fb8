"""The `bucketed` MoE dispatch (the CPU and GPU default, jsmaug/models/moe.py): dropless, fixed shapes, and work in
proportion to the rows really routed, however uneven the routing.

Each expert's first C assignments (C the mean load, rounded up to a multiple of 8) go to an (E, C, D) buffer,
whose SwiGLU is one batched matmul per weight. The rest, the rows of the busier experts beyond C, go to overflow
blocks of `bs` rows, one expert per block. Two ways to run them (`overflow`):

- `loop` (the CPU default): a loop of exactly as many iterations as the routing needs blocks, each block one
  matmul per weight with its expert's weights sliced, not copied. One compiled body, however many blocks.
- `ladder` (elsewhere): M blocks in one batched product (each block's weights gathered), M the smallest rung of a
  ladder (0, 1, 2, 3, 4, 6, 8, 12, ...) that holds them, chosen at run time by `lax.switch` over one compiled
  branch per rung: one launch on a GPU, but about 12 branches, forward and backward, for XLA to compile.

Measured on the 2-core CPU machine (2026-12-07, fwd+bwd of the layer, alternating in one process;
docs/performance.md, "Compiles halved"): the loop took 0.62-0.99x the ladder's time at three shapes and three
router skews (the more skewed, the bigger the gain: no rung rounds up, no weights are copied) and compiled in
0.7-1.4 s against 4.2-7.8 s; the tiny config's whole DPO step compiled in 5.8 s against 10.3. The GPU keeps the
ladder (all blocks in one batched launch, where a loop would launch each block's kernels in turn); neither way has
run on a GPU yet (the H200 run of docs/gpu-tpu.md predates the overflow blocks), so that choice is not a
measurement.

A padded buffer sized for the busiest expert (the earlier design) computes E x its load; this computes E x the
mean plus the overflow rounded up to blocks.

Measured on the 2-core CPU machine (2026-12-03, fwd+bwd, alternating in one process; docs/performance.md, "The
MoE's overflow blocks"): the layer at the bench step model's shape (T=2048, D=256, F=512, top-2 of 8) with its
layers' real loads (busiest 1.36x and 2.11x the mean) took 158 and 195 ms against 174 and 319 ms for a buffer
sized for the busiest expert; a prototype of this layout with 64 experts top-8 (Qwen3-30B-A3B in miniature) took
474-495 against 560 ms under a uniform router and 575 against 801 ms under a skewed one. A base of 1.125x or 1.25x
the mean was no faster anywhere. The overflow block is mean/4 rows, between 8 and 128: 128 beat 64 at a mean of
512 rows, 64 beat 32 at 256.

The expert part has a hand-written VJP (`_grouped_glu`): autodiff through `lax.switch` would make every branch
emit the union of all branches' residuals (zero-filled buffers of the largest one). The residuals are per
assignment instead, the same shape in every branch.

Array names carry their shapes: T tokens, D hidden, F mlp, E experts, K experts per token, A = T*K assignments,
M overflow blocks, B rows per block.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from jsmaug.models import factored
from jsmaug.models.glu import SWIGLU
from jsmaug.parallel import mesh_context

# Overflow-block rungs up to 4, then about x1.5 apart (the last rung is the bound, see `overflow_ladder`).
_RUNGS = (0, 1, 2, 3, 4, 6, 8)


def base_capacity(num_tokens: int, k: int, num_experts: int, mean: float | None = None) -> int:
    """C: the mean load (`mean`, default num_tokens * k / num_experts) rounded up to a multiple of 8, at most
    num_tokens (an expert never gets more rows than there are tokens)."""
    mean = num_tokens * k / num_experts if mean is None else mean
    return max(8, min(num_tokens, -(-math.ceil(mean) // 8) * 8))


def block_rows(capacity: int) -> int:
    """Rows per overflow block: a quarter of the base capacity as a power of two, between 8 and 128."""
    return int(min(128, max(8, 1 << max(0, (capacity // 4).bit_length() - 1))))


def overflow_ladder(num_assign: int, num_experts: int, bs: int) -> tuple[int, ...]:
    """Block counts the branches are compiled for. The last is a bound no routing exceeds: the overflow rows
    number at most A, and each overflowing expert rounds up to at most one block more."""
    bound = -(-num_assign // bs) + num_experts
    rungs, r = list(_RUNGS), _RUNGS[-1]
    while rungs[-1] < bound:
        r = int(r * 1.5)
        rungs.append(r)
    return tuple(sorted({min(r, bound) for r in rungs}))


def needed_blocks(group_sizes_E, capacity: int, bs: int):
    """Overflow blocks the routing needs: each expert's rows beyond the capacity, rounded up to blocks."""
    return jnp.sum((jnp.maximum(group_sizes_E - capacity, 0) + bs - 1) // bs)


def _overflow_layout(capacity, bs, num_blocks, expert_A, slot_A, group_sizes_E):
    """Each overflowing assignment's row in the (M * B) overflow rows (out of range for the others) and each
    block's expert. An expert's overflow starts on a block boundary."""
    num_experts = group_sizes_E.shape[0]
    over_A = (expert_A < num_experts) & (slot_A >= capacity)
    e_A = jnp.minimum(expert_A, num_experts - 1)
    sizes_E = jnp.maximum(group_sizes_E - capacity, 0)  # each expert's rows beyond the base buffer
    padded_E = (sizes_E + bs - 1) // bs * bs
    ends_E = jnp.cumsum(padded_E)
    dest_A = jnp.where(over_A, ends_E[e_A] - padded_E[e_A] + slot_A - capacity, num_blocks * bs)
    block_expert_M = jnp.minimum(jnp.searchsorted(ends_E, jnp.arange(num_blocks) * bs, side="right"),
                                 num_experts - 1).astype(jnp.int32)
    return dest_A, block_expert_M


def to_buffer(v_AxN, expert_A, slot_A, num_experts: int, capacity: int):
    """The base buffer (E, C, N); assignments past the capacity (or of no expert) are dropped."""
    buf = jnp.zeros((num_experts, capacity, v_AxN.shape[-1]), v_AxN.dtype)
    return buf.at[expert_A, slot_A].set(v_AxN, unique_indices=True, mode="drop")


def from_buffer(buf_ExCxN, expert_A, slot_A):
    """Each assignment's row of the base buffer; those past the capacity (or of no expert) read zeros."""
    return buf_ExCxN.at[expert_A, slot_A].get(mode="fill", fill_value=0)


def _to_blocks(v_AxN, dest_A, num_blocks: int, bs: int):
    buf = jnp.zeros((num_blocks * bs, v_AxN.shape[-1]), v_AxN.dtype)
    return buf.at[dest_A].set(v_AxN, unique_indices=True, mode="drop").reshape(num_blocks, bs, -1)


def _from_blocks(v_MxBxN, dest_A):
    return v_MxBxN.reshape(-1, v_MxBxN.shape[-1]).at[dest_A].get(mode="fill", fill_value=0)


def expert_matmuls(spec, xb, w1, w3, w2, glu=SWIGLU, b1=None, b3=None):
    """The gated experts on a buffer with per-buffer-row weights: (output, pre-activations p1, p3). `spec` is "e"
    for the (E, C, .) base buffer with the (E, ...) weights, "m" for the (M, B, .) blocks with weights gathered
    per block; b1/b3 (gpt-oss) the pre-activations' biases, (E, F) or (M, F) likewise."""
    p1 = factored.einsum(f"{spec}cd,{spec}df->{spec}cf", xb, w1)
    p3 = factored.einsum(f"{spec}cd,{spec}df->{spec}cf", xb, w3)
    if b1 is not None:
        p1, p3 = p1 + b1[:, None, :].astype(p1.dtype), p3 + b3[:, None, :].astype(p3.dtype)
    return factored.einsum(f"{spec}cf,{spec}fd->{spec}cd", glu(p1, p3), w2), p1, p3


def _glu_backward(spec, glu, xb, w1, w3, w2, p1, p3, dout):
    """(dxb, dw1, dw3, dw2, dp1, dp3) of `expert_matmuls` from its inputs, pre-activations and output gradient (a
    Factored weight's cotangent is its adapters', jsmaug/models/factored.py; dp1/dp3 give the biases')."""
    dh = factored.einsum(f"{spec}cd,{spec}fd->{spec}cf", dout, w2)
    dp1, dp3 = glu.grads(p1, p3, dh)
    back = f"{spec}cf,{spec}df->{spec}cd"
    dxb = factored.einsum(back, dp1, w1) + factored.einsum(back, dp3, w3)
    return (dxb, factored.weight_grad(spec, xb, dp1, w1), factored.weight_grad(spec, xb, dp3, w3),
            factored.weight_grad(spec, glu(p1, p3), dout, w2), dp1, dp3)


def _overflow_sources(capacity, bs, num_blocks, expert_A, slot_A, group_sizes_E):
    """(each overflow row's assignment, A for an empty row: (M, B); each block's expert (M,)), for the loop."""
    dest_A, be_M = _overflow_layout(capacity, bs, num_blocks, expert_A, slot_A, group_sizes_E)
    num_assign = expert_A.shape[0]
    src = jnp.full((num_blocks * bs,), num_assign, jnp.int32).at[dest_A].set(
        jnp.arange(num_assign, dtype=jnp.int32), mode="drop")
    return src.reshape(num_blocks, bs), be_M


def _rows(v_AxN, rows_B):
    """The block's rows of a per-assignment array, (1, B, N); an empty row (index A) reads zeros."""
    return v_AxN.at[rows_B].get(mode="fill", fill_value=0)[None]


def _forward(layout, num_blocks, glu, x_TxD, w1, w3, w2, b13, token_A, expert_A, slot_A, group_sizes_E,
             need=None):
    """y per assignment and the two pre-activations per assignment (the backward's residuals). The overflow:
    `num_blocks` blocks in one batched product, or (`need` given: the loop) `need` blocks one after the other,
    each with its own expert's weights, `num_blocks` the bound."""
    capacity, bs = layout
    num_experts = w1.shape[0]
    x_AxD = x_TxD[token_A]
    outs = expert_matmuls("e", to_buffer(x_AxD, expert_A, slot_A, num_experts, capacity), w1, w3, w2, glu,
                          *(b13 or ()))
    outs = [from_buffer(v, expert_A, slot_A) for v in outs]
    if need is not None:
        src_MxB, be_M = _overflow_sources(capacity, bs, num_blocks, expert_A, slot_A, group_sizes_E)

        def block(m, outs):
            rows, e = src_MxB[m], be_M[m][None]
            got = expert_matmuls("m", _rows(x_AxD, rows), w1[e], w3[e], w2[e], glu, *(b[e] for b in b13 or ()))
            return tuple(o.at[rows].add(v[0], mode="drop") for o, v in zip(outs, got))
        return jax.lax.fori_loop(0, need, block, tuple(outs))
    if num_blocks:
        dest_A, be_M = _overflow_layout(capacity, bs, num_blocks, expert_A, slot_A, group_sizes_E)
        over = expert_matmuls("m", _to_blocks(x_AxD, dest_A, num_blocks, bs), w1[be_M], w3[be_M], w2[be_M], glu,
                              *(b[be_M] for b in b13 or ()))
        outs = [a + _from_blocks(v, dest_A) for a, v in zip(outs, over)]
    return tuple(outs)


def _backward(layout, num_blocks, glu, x_TxD, w1, w3, w2, b13, token_A, expert_A, slot_A, group_sizes_E, p1_AxF,
              p3_AxF, g_AxD, need=None):
    capacity, bs = layout
    num_experts = w1.shape[0]
    rows = (x_TxD[token_A], p1_AxF, p3_AxF, g_AxD)
    xb, p1, p3, dout = (to_buffer(v, expert_A, slot_A, num_experts, capacity) for v in rows)
    dxb, dw1, dw3, dw2, dp1, dp3 = _glu_backward("e", glu, xb, w1, w3, w2, p1, p3, dout)
    db1, db3 = jnp.sum(dp1, axis=1), jnp.sum(dp3, axis=1)  # empty buffer rows have dout = 0, so dp = 0
    dx_AxD = from_buffer(dxb, expert_A, slot_A)
    if need is not None:
        src_MxB, be_M = _overflow_sources(capacity, bs, num_blocks, expert_A, slot_A, group_sizes_E)

        def block(m, acc):
            dx_AxD, dws, db1, db3 = acc
            r, e = src_MxB[m], be_M[m]
            xb, p1, p3, dout = (_rows(v, r) for v in rows)
            dxb, *dws_m, dp1, dp3 = _glu_backward("m", glu, xb, w1[e[None]], w3[e[None]], w2[e[None]], p1, p3, dout)
            add = lambda a, d: a.at[e].add(d[0])  # noqa: E731
            dws = tuple(jax.tree.map(add, a, d) for a, d in zip(dws, dws_m))
            return (dx_AxD.at[r].add(dxb[0], mode="drop"), dws, add(db1, jnp.sum(dp1, axis=1)),
                    add(db3, jnp.sum(dp3, axis=1)))
        dx_AxD, (dw1, dw3, dw2), db1, db3 = jax.lax.fori_loop(0, need, block, (dx_AxD, (dw1, dw3, dw2), db1, db3))
    elif num_blocks:
        dest_A, be_M = _overflow_layout(capacity, bs, num_blocks, expert_A, slot_A, group_sizes_E)
        xb, p1, p3, dout = (_to_blocks(v, dest_A, num_blocks, bs) for v in rows)
        dxb, *dws, dp1, dp3 = _glu_backward("m", glu, xb, w1[be_M], w3[be_M], w2[be_M], p1, p3, dout)
        dx_AxD = dx_AxD + _from_blocks(dxb, dest_A)
        per_expert = lambda a, d: a + jax.ops.segment_sum(d, be_M, num_experts, indices_are_sorted=True)  # noqa: E731
        dw1, dw3, dw2 = (jax.tree.map(per_expert, a, d) for a, d in zip((dw1, dw3, dw2), dws))
        db1, db3 = per_expert(db1, jnp.sum(dp1, axis=1)), per_expert(db3, jnp.sum(dp3, axis=1))
    dws = (factored.with_frozen_base(d, w) for d, w in zip((dw1, dw3, dw2), (w1, w3, w2)))
    db13 = None if b13 is None else (db1.astype(b13[0].dtype), db3.astype(b13[1].dtype))
    return (jnp.zeros_like(x_TxD).at[token_A].add(dx_AxD), *dws, db13)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _grouped_glu(layout, ladder, glu, x_TxD, w1, w3, w2, b13, token_A, expert_A, slot_A, group_sizes_E, branch):
    """The gated experts on the sorted assignments: the base buffer plus ladder[branch] overflow blocks, or (an
    int `ladder`: the loop, its bound) `branch` blocks in a loop."""
    return _grouped_glu_fwd(layout, ladder, glu, x_TxD, w1, w3, w2, b13, token_A, expert_A, slot_A, group_sizes_E,
                            branch)[0]


def _run(fn, layout, ladder, glu, branch, *args):
    if isinstance(ladder, int):  # the loop: one program, `branch` blocks
        return fn(layout, ladder, glu, *args, need=branch)
    return jax.lax.switch(branch, [functools.partial(fn, layout, m, glu) for m in ladder], *args)


def _grouped_glu_fwd(layout, ladder, glu, x_TxD, w1, w3, w2, b13, token_A, expert_A, slot_A, group_sizes_E,
                     branch):
    routing = (token_A, expert_A, slot_A, group_sizes_E)
    y, p1, p3 = _run(_forward, layout, ladder, glu, branch, x_TxD, w1, w3, w2, b13, *routing)
    return y, (x_TxD, w1, w3, w2, b13, routing, branch, p1, p3)


def _grouped_glu_bwd(layout, ladder, glu, res, g_AxD):
    x_TxD, w1, w3, w2, b13, routing, branch, p1, p3 = res
    grads = _run(_backward, layout, ladder, glu, branch, x_TxD, w1, w3, w2, b13, *routing, p1, p3, g_AxD)
    return (*grads, None, None, None, None, None)


_grouped_glu.defvjp(_grouped_glu_fwd, _grouped_glu_bwd)


def plan(num_tokens: int, k: int, num_experts: int, mean_load: float | None = None):
    """The static layout ((capacity, rows per block), overflow ladder) for these shapes."""
    capacity = base_capacity(num_tokens, k, num_experts, mean_load)
    bs = block_rows(capacity)
    return (capacity, bs), overflow_ladder(num_tokens * k, num_experts, bs)


def expert_part(x_TxD, w1, w3, w2, token_A, expert_A, slot_A, group_sizes_E, mean_load=None, glu=SWIGLU, b13=None,
                overflow: str = "auto"):
    """y per sorted assignment (A, D): the base buffer and as many overflow blocks as the routing needs. `glu` the
    gated activation (jsmaug/models/glu.py), `b13` None or the (E, F) biases of the gate and up pre-activations.
    `overflow`: "ladder" (a `lax.switch` over one batched branch per rung), "loop" (one block per iteration of
    a loop of as many iterations as there are blocks), or "auto": the loop on CPU, the ladder elsewhere."""
    num_tokens, num_experts = x_TxD.shape[0], w1.shape[0]
    layout, ladder = plan(num_tokens, token_A.shape[0] // num_tokens, num_experts, mean_load)
    need = needed_blocks(group_sizes_E, *layout)
    if overflow_mode(overflow) == "loop":
        return _grouped_glu(layout, ladder[-1], glu, x_TxD, w1, w3, w2, b13, token_A, expert_A, slot_A,
                            group_sizes_E, need.astype(jnp.int32))
    branch = jnp.searchsorted(jnp.asarray(ladder), need, side="left").astype(jnp.int32)
    return _grouped_glu(layout, ladder, glu, x_TxD, w1, w3, w2, b13, token_A, expert_A, slot_A, group_sizes_E,
                        branch)


def overflow_mode(overflow: str = "auto") -> str:
    """"auto" -> "loop" on CPU (the compile target's platform), "ladder" elsewhere; others as given."""
    if overflow not in ("auto", "loop", "ladder"):
        raise ValueError(f"bucketed overflow {overflow!r}: one of auto, loop, ladder")
    if overflow != "auto":
        return overflow
    return "loop" if mesh_context.target_platform() == "cpu" else "ladder"
