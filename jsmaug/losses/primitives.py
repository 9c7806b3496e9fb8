"""The formulas on arrays (optax style): DPOP and the classic DPO family, and the metrics trainers log.

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

import chex
import jax
import jax.numpy as jnp


def check_logps(*arrays: jax.Array) -> None:
    for a in arrays:
        if not jnp.issubdtype(jnp.asarray(a).dtype, jnp.floating):
            raise TypeError(f"log-probabilities must be floating point, got dtype {jnp.asarray(a).dtype}")
    chex.assert_rank(arrays, 1)
    chex.assert_equal_shape(arrays)


def _delta(pc, pr, rc, rr):
    check_logps(pc, pr, rc, rr)
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
    check_logps(chosen_logps)
    return -chosen_logps / jnp.maximum(chosen_num_tokens, 1).astype(chosen_logps.dtype)


# ------------------------------------------------------------------------------------------------ metrics

def preference_metrics(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                       reference_rejected_logps, *, beta: float) -> dict[str, jax.Array]:
    """The metrics DPO trainers log (TRL names), plus DPOP's penalty statistics. All are batch means."""
    check_logps(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
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
