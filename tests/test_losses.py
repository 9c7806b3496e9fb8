"""The formulas on arrays (`losses.primitives`) against NumPy, finite differences and the DPOP paper's properties."""

import chex
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import jax
import jax.numpy as jnp

from jsmaug import losses
from numeric import check_grads_by_finite_differences

jax.config.update("jax_enable_x64", False)


def np_log_sigmoid(x):
    x = np.asarray(x, np.float64)
    return np.where(x >= 0, -np.log1p(np.exp(-x)), x - np.log1p(np.exp(x)))


def np_dpop(pc, pr, rc, rr, beta, lam):
    delta = (pc - rc) - (pr - rr)
    return -np_log_sigmoid(beta * (delta - lam * np.maximum(0.0, rc - pc)))


def np_dpo(pc, pr, rc, rr, beta, ls=0.0):
    z = beta * ((pc - rc) - (pr - rr))
    return -(1 - ls) * np_log_sigmoid(z) - ls * np_log_sigmoid(-z)


def np_ipo(pc, pr, rc, rr, beta):
    return (((pc - rc) - (pr - rr)) - 1 / (2 * beta)) ** 2


def np_hinge(pc, pr, rc, rr, beta):
    return np.maximum(0.0, 1 - beta * ((pc - rc) - (pr - rr)))


def _inputs(regime, n=16, seed=0):
    rng = np.random.default_rng(seed)
    rc = rng.uniform(-60, -5, n)
    rr = rng.uniform(-60, -5, n)
    # Active penalty: policy chosen below reference; inactive: above.
    pc = rc + (rng.uniform(-4, -0.1, n) if regime == "active" else rng.uniform(0.1, 4, n))
    pr = rr + rng.uniform(-4, 4, n)
    return [x.astype(np.float32) for x in (pc, pr, rc, rr)]


class LossValuesTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_all_losses_equal_numpy(self):
        for regime in ("active", "inactive"):
            pc, pr, rc, rr = _inputs(regime)
            for beta, lam in ((0.3, 50.0), (0.1, 5.0), (1.0, 0.5)):
                got = self.variant(lambda *a: losses.dpop(*a, beta=beta, lam=lam))(pc, pr, rc, rr)
                np.testing.assert_allclose(got, np_dpop(pc, pr, rc, rr, beta, lam), rtol=1e-6, atol=1e-6)
                got = self.variant(lambda *a: losses.dpo_sigmoid(*a, beta=beta, label_smoothing=0.1))(pc, pr, rc, rr)
                np.testing.assert_allclose(got, np_dpo(pc, pr, rc, rr, beta, 0.1), rtol=1e-6, atol=1e-6)
                got = self.variant(lambda *a: losses.ipo(*a, beta=beta))(pc / 10, pr / 10, rc / 10, rr / 10)
                np.testing.assert_allclose(got, np_ipo(pc / 10, pr / 10, rc / 10, rr / 10, beta), rtol=1e-5, atol=1e-5)
                got = self.variant(lambda *a: losses.hinge(*a, beta=beta))(pc, pr, rc, rr)
                np.testing.assert_allclose(got, np_hinge(pc, pr, rc, rr, beta), rtol=1e-6, atol=1e-6)
            # In the active regime the penalty really is on.
            pen = np.maximum(0, rc - pc)
            assert (pen > 0).all() if regime == "active" else (pen == 0).all()

    @chex.variants(with_jit=True, without_jit=True)
    def test_vmap_over_hyperparameters(self):
        pc, pr, rc, rr = _inputs("active")
        betas = jnp.array([0.1, 0.3, 1.0])
        got = self.variant(jax.vmap(lambda b: losses.dpop(pc, pr, rc, rr, beta=b, lam=50.0)))(betas)
        for i, b in enumerate([0.1, 0.3, 1.0]):
            np.testing.assert_allclose(got[i], np_dpop(pc, pr, rc, rr, b, 50.0), rtol=1e-6, atol=1e-6)


def test_dpop_lam0_is_dpo_and_inactive_regime_equal_with_grads():
    for regime in ("active", "inactive"):
        pc, pr, rc, rr = _inputs(regime, seed=3)
        np.testing.assert_allclose(losses.dpop(pc, pr, rc, rr, beta=0.3, lam=0.0),
                                   losses.dpo_sigmoid(pc, pr, rc, rr, beta=0.3), rtol=1e-7)
    pc, pr, rc, rr = _inputs("inactive", seed=4)
    f_dpop = lambda a, b: jnp.sum(losses.dpop(a, b, rc, rr, beta=0.3, lam=50.0))
    f_dpo = lambda a, b: jnp.sum(losses.dpo_sigmoid(a, b, rc, rr, beta=0.3))
    np.testing.assert_allclose(f_dpop(pc, pr), f_dpo(pc, pr), rtol=1e-7)
    for g1, g2 in zip(jax.grad(f_dpop, (0, 1))(pc, pr), jax.grad(f_dpo, (0, 1))(pc, pr)):
        np.testing.assert_allclose(g1, g2, rtol=1e-7)
    # ...and in the active regime the gradients differ (the penalty pushes chosen up).
    pc, pr, rc, rr = _inputs("active", seed=4)
    g_dpop = jax.grad(lambda a: jnp.sum(losses.dpop(a, pr, rc, rr, beta=0.3, lam=50.0)))(pc)
    g_dpo = jax.grad(lambda a: jnp.sum(losses.dpo_sigmoid(a, pr, rc, rr, beta=0.3)))(pc)
    assert (g_dpop < g_dpo).all()  # more negative gradient on pi_c: descent raises pi_c harder


def test_dpop_gradient_at_the_tie_equals_dpo():
    """Every DPOP run starts at pi_c == ref_c. There the penalty must not act, gradient included: the gradient
    on pi_c is DPO's, not DPO's plus 0.5 * beta * lam * sigmoid(-z) (jnp.maximum's subgradient at 0)."""
    pc = np.array([-10.0, -7.5, -3.0], np.float32)
    pr = np.array([-11.0, -7.0, -3.5], np.float32)
    rc, rr = pc.copy(), pr + np.float32(0.25)
    f_dpop = lambda a, b: jnp.sum(losses.dpop(a, b, rc, rr, beta=0.3, lam=50.0))
    f_dpo = lambda a, b: jnp.sum(losses.dpo_sigmoid(a, b, rc, rr, beta=0.3))
    for g1, g2 in zip(jax.grad(f_dpop, (0, 1))(pc, pr), jax.grad(f_dpo, (0, 1))(pc, pr)):
        np.testing.assert_allclose(g1, g2, rtol=1e-7)
    # DPO's gradient on pi_c by hand: -beta * sigmoid(-beta * delta), delta = (pc - rc) - (pr - rr) = 0.25.
    want = -0.3 / (1.0 + np.exp(0.3 * 0.25))
    np.testing.assert_allclose(jax.grad(f_dpop)(pc, pr), np.full(3, want, np.float32), rtol=1e-6)
    # One ulp below the reference, the penalty's full lam term switches on.
    below = np.nextafter(pc, np.float32(-np.inf))
    g_below = jax.grad(f_dpop)(below, pr)
    assert (g_below < 20 * want).all(), g_below
    m = losses.preference_metrics(pc, pr, rc, rr, beta=0.3)
    assert float(m["dpop/penalty"]) == 0.0 and float(m["dpop/active_fraction"]) == 0.0


def test_beta_scale_by_value():
    """Doubling beta doubles the sigmoid argument (not beta squared, MaxText's old bug)."""
    pc, pr, rc, rr = (np.array([x], np.float32) for x in (-10.0, -12.0, -11.0, -11.5))
    delta = (-10.0 + 11.0) - (-12.0 + 11.5)  # = 1.5, no penalty
    for beta in (0.1, 0.2, 0.4):
        want = np.log1p(np.exp(-beta * delta))
        np.testing.assert_allclose(losses.dpop(pc, pr, rc, rr, beta=beta, lam=50.0)[0], want, rtol=1e-6)
    # With the penalty active, lam is inside the beta bracket: z = beta*(delta - lam*pen).
    pc2 = np.array([-12.0], np.float32)  # pen = 1, delta = -1 + 0.5 = -0.5
    want = np.log1p(np.exp(-0.3 * (-0.5 - 50.0 * 1.0)))
    np.testing.assert_allclose(losses.dpop(pc2, pr, rc, rr, beta=0.3, lam=50.0)[0], want, rtol=1e-6)


@pytest.mark.parametrize("name", ["dpop", "dpo", "ipo", "hinge"])
def test_gradients_match_finite_differences_and_reference_gets_none(name):
    jax.config.update("jax_enable_x64", True)
    try:
        rng = np.random.default_rng(7)
        x = [rng.uniform(-3, -0.5, 6) for _ in range(4)]
        x[0] = x[2] + np.array([-0.5, -0.2, 0.3, 0.6, -0.8, 0.1])  # both regimes
        fn = {"dpop": lambda *a: losses.dpop(*a, beta=0.7, lam=2.0),
              "dpo": lambda *a: losses.dpo_sigmoid(*a, beta=0.7, label_smoothing=0.1),
              "ipo": lambda *a: losses.ipo(*a, beta=0.7),
              "hinge": lambda *a: losses.hinge(*a, beta=0.3)}[name]
        check_grads_by_finite_differences(lambda *a: jnp.sum(fn(*a)), x, label=name)
    finally:
        jax.config.update("jax_enable_x64", False)


logp = st.floats(min_value=-1e4, max_value=0.0, allow_nan=False, width=32)


@settings(max_examples=200, deadline=None)
@given(pc=logp, pr=logp, rc=logp, rr=logp, beta=st.floats(0.01, 5.0), lam=st.floats(0.0, 500.0))
def test_dpop_never_below_dpo_and_finite(pc, pr, rc, rr, beta, lam):
    a = [np.array([v], np.float32) for v in (pc, pr, rc, rr)]
    l_dpop = float(losses.dpop(*a, beta=beta, lam=lam)[0])
    l_dpo = float(losses.dpo_sigmoid(*a, beta=beta)[0])
    assert np.isfinite(l_dpop) and np.isfinite(l_dpo)
    assert l_dpop >= l_dpo - 1e-6 * max(1.0, abs(l_dpo))
    g = jax.grad(lambda x: losses.dpop(x, *a[1:], beta=beta, lam=lam)[0])(a[0])
    assert np.isfinite(np.asarray(g)).all()


def test_nll_and_the_table():
    x = losses.LossInputs(*(jnp.array([-6.0, -3.0]),) * 4, chosen_num_tokens=jnp.array([3, 0]),
                          rejected_num_tokens=jnp.array([2, 2]))
    np.testing.assert_allclose(losses.nll(x.policy_chosen_logps, x.chosen_num_tokens), [2.0, 3.0])
    # sft (TRL's): the batch's NLL per chosen token, 9 nats over 3 tokens, in every entry's share.
    np.testing.assert_allclose(np.mean(losses.preference_loss("sft", x)), 3.0)
    np.testing.assert_allclose(losses.preference_loss("dpop", x, beta=0.3, dpop_lambda=50.0), [np.log(2)] * 2, rtol=1e-6)
    # ipo through the table length-averages: delta = 0 here, loss = (1/(2 beta))^2
    np.testing.assert_allclose(losses.preference_loss("ipo", x, beta=0.5), [1.0, 1.0], rtol=1e-6)
    assert not losses.needs_reference("sft") and losses.needs_reference("dpop") and losses.needs_reference("dpo")
    assert not losses.needs_reference("simpo") and not losses.needs_reference("orpo")


def test_preference_metrics_values():
    pc, pr, rc, rr = (jnp.array(v) for v in ([-1.0, -5.0], [-2.0, -1.0], [-2.0, -4.0], [-2.0, -2.0]))
    m = losses.preference_metrics(pc, pr, rc, rr, beta=0.5)
    np.testing.assert_allclose(m["rewards/chosen"], np.mean([0.5, -0.5]))
    np.testing.assert_allclose(m["rewards/rejected"], np.mean([0.0, 0.5]))
    np.testing.assert_allclose(m["rewards/accuracies"], 0.5)
    np.testing.assert_allclose(m["rewards/margins"], np.mean([0.5, -1.0]))
    np.testing.assert_allclose(m["dpop/penalty"], 0.5)
    np.testing.assert_allclose(m["dpop/active_fraction"], 0.5)


def test_bad_inputs_raise_clearly():
    good = jnp.zeros((4,))
    with pytest.raises(AssertionError, match="rank"):
        losses.dpop(jnp.zeros((4, 2)), good, good, good, beta=0.1, lam=1.0)
    with pytest.raises(AssertionError, match="shape"):
        losses.dpop(jnp.zeros((3,)), good, good, good, beta=0.1, lam=1.0)
    with pytest.raises(TypeError, match="floating point"):
        losses.dpo_sigmoid(jnp.zeros((4,), jnp.int32), good, good, good, beta=0.1)

