"""Preference losses as pure functions of arrays (optax style): DPOP and its siblings.

Every per-example loss takes the summed completion log-probabilities
    (policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps),
each of shape (B,) float, plus keyword hyper-parameters, and returns a (B,) loss. The reference inputs go through
`jax.lax.stop_gradient` inside every loss: the reference never learns, whatever the caller passes.

    delta = (pi_c - ref_c) - (pi_r - ref_r)          # the DPO "implicit reward" margin, before beta

References:
  DPOP: Pal et al., "Smaug: Fixing Failure Modes of Preference Optimisation with DPO-Positive",
        arXiv 2402.13228 (corrected version, July 2024).
  DPO:  Rafailov et al., arXiv 2305.18290.   cDPO: Mitchell, "A note on DPO with noisy preferences" (2023).
  IPO:  Azar et al., arXiv 2310.12036.        hinge (SLiC-style): Zhao et al., arXiv 2305.10425.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import chex
import jax
import jax.numpy as jnp


def _check_logps(*arrays: jax.Array) -> None:
    for a in arrays:
        if not jnp.issubdtype(jnp.asarray(a).dtype, jnp.floating):
            raise TypeError(f"log-probabilities must be floating point, got dtype {jnp.asarray(a).dtype}")
    chex.assert_rank(arrays, 1)
    chex.assert_equal_shape(arrays)


def _delta(pc, pr, rc, rr):
    _check_logps(pc, pr, rc, rr)
    rc, rr = jax.lax.stop_gradient(rc), jax.lax.stop_gradient(rr)
    return (pc - rc) - (pr - rr), rc


def dpop(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, *,
         beta: float, lam: float) -> jax.Array:
    """DPO-Positive (arXiv 2402.13228, eq. 3 of the corrected version).

        penalty = max(0, ref_c - pi_c)
        loss    = -log_sigmoid( beta * (delta - lam * penalty) )

    lam sits inside the beta bracket and inside the sigmoid. With lam = 0 this is exactly `dpo_sigmoid`; while
    pi_c >= ref_c (no penalty) the two are identical, gradients included.

    The tie pi_c == ref_c counts as "no penalty", gradient included: `jnp.maximum(0, x)` has gradient 0.5 at
    x = 0, which would add a 0.5 * lam NLL push on every chosen completion at step 1 of every run (the policy
    starts equal to its reference). The penalty acts only where the policy is strictly below the reference.
    """
    delta, rc = _delta(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    return -jax.nn.log_sigmoid(beta * (delta - lam * dpop_penalty(policy_chosen_logps, rc)))


def dpop_penalty(policy_chosen_logps, reference_chosen_logps) -> jax.Array:
    """max(0, ref_c - pi_c), with gradient 0 at the tie (see `dpop`); the reference gets no gradient."""
    gap = jax.lax.stop_gradient(reference_chosen_logps) - policy_chosen_logps
    return jnp.where(gap > 0, gap, 0.0)


def dpo_sigmoid(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, *,
                beta: float, label_smoothing: float = 0.0) -> jax.Array:
    """DPO's sigmoid loss, with cDPO label smoothing eps:

        loss = -(1 - eps) * log_sigmoid(beta * delta) - eps * log_sigmoid(-beta * delta)
    """
    delta, _ = _delta(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    return (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * delta)
            - label_smoothing * jax.nn.log_sigmoid(-beta * delta))


def ipo(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, *,
        beta: float) -> jax.Array:
    """IPO: loss = (delta - 1 / (2 beta))^2.

    IPO is defined on LENGTH-AVERAGED log-probabilities: pass logps divided by the number of completion tokens
    (the trainer's `loss.type=ipo` does this for you).
    """
    delta, _ = _delta(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    return (delta - 1.0 / (2.0 * beta)) ** 2


def hinge(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, *,
          beta: float) -> jax.Array:
    """Hinge (SLiC-style) loss: relu(1 - beta * delta)."""
    delta, _ = _delta(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    return jax.nn.relu(1.0 - beta * delta)


def nll(chosen_logps, chosen_num_tokens) -> jax.Array:
    """Per-example negative log-likelihood per completion token: -logp / max(num_tokens, 1) (SFT, RPO mixing)."""
    _check_logps(chosen_logps)
    return -chosen_logps / jnp.maximum(chosen_num_tokens, 1).astype(chosen_logps.dtype)


# ------------------------------------------------------------------------------------------------ log-probs

def _label_logps(logits_BxSxV, labels_BxS):
    logits = logits_BxSxV.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, labels_BxS[..., None], axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


def sequence_logps(logits_BxSxV, labels_BxS, loss_mask_BxS, *, chunk_size: int | None = None):
    """Per-sequence sum of log p(label) over `loss_mask` tokens. Labels are already shifted (labels[t] is the
    token that logits[t] predicts). Returns (sum_logps (B,) float32, num_tokens (B,) int32).

    Memory: never builds a float32 log_softmax beside the logits (gather minus logsumexp). With `chunk_size`
    the float32 upcast happens one sequence chunk at a time (useful for bf16 logits with a large vocabulary).
    """
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
        lp = _chunked_over_sequence(lambda lg, lb: _label_logps(lg, lb), logits_BxSxV, labels_BxS, chunk_size)
    return jnp.sum(lp * mask, axis=1), jnp.sum(loss_mask_BxS.astype(jnp.int32), axis=1)


def sequence_logps_from_hidden(hidden_BxSxD, unembed: Callable, labels_BxS, loss_mask_BxS, *,
                               chunk_size: int | None = None):
    """Like `sequence_logps`, from final hidden states and an `unembed(h) -> logits` function.

    With `chunk_size`, only the `loss_mask` positions are unembedded: each row's are gathered to its front and
    processed `chunk_size` positions per row (B * chunk_size rows) at a time, and chunks past the longest row's
    masked positions are skipped at run time (`lax.cond`); the batch axis stays whole, so it stays sharded. Prompt and padding positions never reach the vocabulary
    matmul and log-softmax, forward or backward. Each chunk is recomputed in the backward pass, so the (rows, V)
    logits exist one chunk at a time.
    """
    chex.assert_rank(hidden_BxSxD, 3)
    mask = loss_mask_BxS.astype(jnp.float32)

    def chunk_fn(h, lb):
        return _label_logps(unembed(h), lb)

    if chunk_size is None:
        lp = chunk_fn(hidden_BxSxD, labels_BxS)
    else:
        lp = _masked_positions_only(jax.checkpoint(chunk_fn), hidden_BxSxD, labels_BxS, loss_mask_BxS, chunk_size)
    return jnp.sum(lp * mask, axis=1), jnp.sum(loss_mask_BxS.astype(jnp.int32), axis=1)


def _masked_positions_only(fn, h_BxSxD, labels_BxS, mask_BxS, chunk: int):
    """fn(h (B, chunk, D), labels (B, chunk)) -> (B, chunk) on the masked positions only; 0 elsewhere.

    Within each row, the masked positions are moved to the front (a stable per-row sort), and the rows are
    processed `chunk` positions at a time; chunks past the longest row's count are skipped at run time. The batch
    axis is never flattened, so on a mesh each device unembeds only its own rows (a global gather over the
    flattened batch would make every device do every row's work). Positions past a row's count are fed zeros."""
    b, s, d = h_BxSxD.shape
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
                            lambda: jnp.zeros((b, chunk), jnp.float32))

    lp_NxBxC = jax.lax.map(one, jnp.arange((s + pad) // chunk))
    lp_BxS = jnp.moveaxis(lp_NxBxC, 0, 1).reshape(b, s + pad)[:, :s]
    lp_BxS = jnp.where(live_BxS, lp_BxS, 0.0)
    rows_BxS = jnp.broadcast_to(jnp.arange(b)[:, None], (b, s))
    return jnp.zeros((b, s), jnp.float32).at[rows_BxS, order_BxS].set(lp_BxS, unique_indices=True)


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


# ------------------------------------------------------------------------------------------------ metrics

def preference_metrics(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                       reference_rejected_logps, *, beta: float) -> dict[str, jax.Array]:
    """The metrics DPO trainers log (TRL names), plus DPOP's penalty statistics. All are batch means."""
    _check_logps(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    rc = jax.lax.stop_gradient(reference_chosen_logps)
    rr = jax.lax.stop_gradient(reference_rejected_logps)
    reward_c = beta * (policy_chosen_logps - rc)
    reward_r = beta * (policy_rejected_logps - rr)
    penalty = dpop_penalty(policy_chosen_logps, rc)
    return {
        "rewards/chosen": jnp.mean(reward_c),
        "rewards/rejected": jnp.mean(reward_r),
        "rewards/accuracies": jnp.mean((reward_c > reward_r).astype(jnp.float32)),
        "rewards/margins": jnp.mean(reward_c - reward_r),
        "logps/chosen": jnp.mean(policy_chosen_logps),
        "logps/rejected": jnp.mean(policy_rejected_logps),
        "dpop/penalty": jnp.mean(penalty),
        "dpop/active_fraction": jnp.mean((penalty > 0).astype(jnp.float32)),
    }


# ------------------------------------------------------------------------------------------------ the table

class LossInputs(NamedTuple):
    """What the trainer hands a loss: summed completion logps and token counts, each (B,)."""
    policy_chosen_logps: jax.Array
    policy_rejected_logps: jax.Array
    reference_chosen_logps: jax.Array
    reference_rejected_logps: jax.Array
    chosen_num_tokens: jax.Array
    rejected_num_tokens: jax.Array


def _logps4(x: LossInputs):
    return x.policy_chosen_logps, x.policy_rejected_logps, x.reference_chosen_logps, x.reference_rejected_logps


def _length_averaged(x: LossInputs):
    nc = jnp.maximum(x.chosen_num_tokens, 1).astype(jnp.float32)
    nr = jnp.maximum(x.rejected_num_tokens, 1).astype(jnp.float32)
    return x.policy_chosen_logps / nc, x.policy_rejected_logps / nr, x.reference_chosen_logps / nc, \
        x.reference_rejected_logps / nr


# name -> (per-example loss from LossInputs and hyper-parameters, needs a reference?)
LOSSES: dict[str, tuple[Callable[..., jax.Array], bool]] = {
    "dpop": (lambda x, beta, dpop_lambda, **_: dpop(*_logps4(x), beta=beta, lam=dpop_lambda), True),
    "dpo": (lambda x, beta, label_smoothing=0.0, **_: dpo_sigmoid(*_logps4(x), beta=beta,
                                                                  label_smoothing=label_smoothing), True),
    "ipo": (lambda x, beta, **_: ipo(*_length_averaged(x), beta=beta), True),
    "hinge": (lambda x, beta, **_: hinge(*_logps4(x), beta=beta), True),
    "sft": (lambda x, **_: nll(x.policy_chosen_logps, x.chosen_num_tokens), False),
}


def needs_reference(name: str) -> bool:
    return _lookup(name)[1]


def _lookup(name: str):
    if name not in LOSSES:
        raise ValueError(f"unknown loss type {name!r}; known: {sorted(LOSSES)}")
    return LOSSES[name]


def preference_loss(name: str, inputs: LossInputs, **hparams) -> jax.Array:
    """Per-example loss selected by name (`dpop`, `dpo`, `ipo`, `hinge`, `sft`). A new loss is one function
    plus one entry in `LOSSES`."""
    return _lookup(name)[0](inputs, **hparams)
