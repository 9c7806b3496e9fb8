"""The loss family against TRL 1.16's own code (its DPOTrainer._compute_loss driven with per-token log-probs we
choose; its CPO and ORPO loss methods), against independent NumPy formulas, and against finite differences."""

import collections
import types

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jsmaug import losses

from jsmaug.losses import config as loss_config

from jsmaug.models import logps as logps_lib
from jsmaug.train.config import LossSection
from numeric import check_grads_by_finite_differences

torch = pytest.importorskip("torch")
trl = pytest.importorskip("trl", reason="trl is in the test extra (pip install -e '.[test]')")

B, S = 6, 9
DPO_TYPES = ["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
             "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"]
F_DIV_TYPES = ["sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"]


def _tokens(seed=0):
    """Per-token log-probs of a [chosen; rejected] batch (2B, S-1), TRL's shifted completion mask, and the
    log-sum-of-squared-probabilities WPO aligns by."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((2 * B, S), np.int64)
    for i in range(2 * B):
        start = rng.integers(1, 4)
        mask[i, start:start + rng.integers(2, S - start + 1)] = 1
    shift = mask[:, 1:]
    lp = np.where(shift > 0, rng.uniform(-3.0, -0.05, (2 * B, S - 1)), 0.0)
    ref = np.where(shift > 0, rng.uniform(-3.0, -0.05, (2 * B, S - 1)), 0.0)
    lss = rng.uniform(-2.5, -0.2, (2 * B, S - 1))
    return mask, shift, lp, ref, lss


def _trl_loss(types_, weights=None, *, beta=0.3, ls=0.1, f_div="reverse_kl", f_alpha=0.5, ld_alpha=None,
              wpo=False, tau=0.05, seed=0):
    """TRL's DPOTrainer._compute_loss on a fake model that returns our per-token log-probs."""
    from trl import DPOTrainer

    mask, shift, lp, ref, lss = _tokens(seed)
    t = lambda a: torch.as_tensor(a, dtype=torch.float32 if np.asarray(a).dtype.kind == "f" else None)  # noqa: E731
    comp_pos = np.cumsum(shift, 1)
    lens = shift.sum(1)
    shared = np.minimum(lens[:B], lens[B:])
    shared = np.concatenate([shared, shared])[:, None]
    wts = shift * (1.0 if ld_alpha is None else np.where(comp_pos <= shared, 1.0, ld_alpha))
    ref_logps = (ref * wts).sum(1)
    out = types.SimpleNamespace(log_probs=t(lp), entropy=torch.zeros(2 * B, S - 1), mean_logits=torch.zeros(2 * B, S - 1),
                                is_top1=torch.zeros(2 * B, S - 1, dtype=torch.bool), log_sum_sq_probs=t(lss),
                                aux_loss=torch.tensor(0.0))
    fake = types.SimpleNamespace(training=True)
    trainer = object.__new__(DPOTrainer)
    trainer.__dict__.update(
        model=fake, aux_loss_enabled=False, ld_alpha=ld_alpha, precompute_ref_logps=True, f_divergence_type=f_div,
        f_alpha_divergence_coef=f_alpha, loss_types=list(types_), loss_weights=list(weights or [1.0] * len(types_)),
        beta=beta, label_smoothing=ls, use_weighting=wpo, args=types.SimpleNamespace(discopop_tau=tau),
        accelerator=types.SimpleNamespace(device="cpu", gather_for_metrics=lambda x: x, gather=lambda x: x),
        _metrics=collections.defaultdict(lambda: collections.defaultdict(list)), _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": t(np.ones((2 * B, S), np.int64)), "attention_mask": t(np.ones((2 * B, S), np.int64)),
              "completion_mask": t(mask), "ref_chosen_logps": t(ref_logps[:B]), "ref_rejected_logps": t(ref_logps[B:])}
    loss = DPOTrainer._compute_loss(trainer, lambda **kw: out, inputs, return_outputs=False)
    return float(loss)


def _ours(types_, weights=None, *, beta=0.3, ls=0.1, f_div="reverse_kl", f_alpha=0.5, ld_alpha=None, wpo=False,
          tau=0.05, seed=0, extra=None):
    mask, shift, lp, ref, lss = _tokens(seed)
    w = np.asarray(logps_lib.ld_weights(jnp.asarray(shift), ld_alpha)) if ld_alpha is not None else shift
    split = lambda x: (jnp.asarray(x[:B], jnp.float32), jnp.asarray(x[B:], jnp.float32))  # noqa: E731
    inputs = losses.LossInputs(*split((lp * w).sum(1)), *split((ref * w).sum(1)), *split(shift.sum(1)),
                               *split(lp.sum(1)), *split(((lp - lss) * shift).sum(1)))
    cfg = LossSection(type=tuple(types_), weights=tuple(weights or ()), beta=beta, label_smoothing=ls,
                      f_divergence=f_div, f_alpha=f_alpha, ld_alpha=ld_alpha, wpo=wpo, discopop_tau=tau, **(extra or {}))
    total, _ = loss_config.objective(cfg)(inputs)
    return float(jnp.mean(total)), inputs


@pytest.mark.parametrize("loss_type", DPO_TYPES)
def test_every_dpo_trainer_loss_equals_trls(loss_type):
    for seed in (0, 1):
        want = _trl_loss([loss_type], seed=seed)
        got, _ = _ours([loss_type if loss_type != "sigmoid" else "dpo"], seed=seed,
                       ls=0.0 if loss_type == "sigmoid" else 0.1)  # TRL's sigmoid has no label smoothing
        if loss_type == "sigmoid":
            want = _trl_loss([loss_type], seed=seed, ls=0.0)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7, err_msg=loss_type)


@pytest.mark.parametrize("f_div,f_alpha", [("forward_kl", 0.5), ("js_divergence", 0.5), ("alpha_divergence", 0.3),
                                           ("alpha_divergence", 1.0)])
def test_f_divergences_equal_trls_on_every_loss_that_allows_them(f_div, f_alpha):
    for loss_type in F_DIV_TYPES:
        ls = 0.0 if loss_type == "sigmoid" else 0.1
        want = _trl_loss([loss_type], f_div=f_div, f_alpha=f_alpha, ls=ls)
        got, _ = _ours([loss_type], f_div=f_div, f_alpha=f_alpha, ls=ls)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7, err_msg=f"{loss_type} {f_div}")


@pytest.mark.parametrize("types_,weights,ld_alpha,wpo", [
    (["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0], None, False),  # MPO
    (["sigmoid", "sft"], [1.0, 1.0], None, False),  # RPO
    (["sigmoid"], None, 0.5, False),  # LD-DPO
    (["ipo", "sigmoid_norm", "sft"], [1.0, 0.5, 0.3], 0.3, False),
    (["sigmoid"], None, None, True),  # WPO
    (["hinge", "apo_zero"], [0.5, 2.0], 0.7, True),
])
def test_weighted_combinations_ld_dpo_and_wpo_equal_trls(types_, weights, ld_alpha, wpo):
    want = _trl_loss(types_, weights, ld_alpha=ld_alpha, wpo=wpo, ls=0.0)
    got, _ = _ours(types_, weights, ld_alpha=ld_alpha, wpo=wpo, ls=0.0)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_simpo_cpo_orpo_equal_trls_trainers():
    from trl.experimental.cpo.cpo_trainer import CPOTrainer
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    mask, shift, lp, _, _ = _tokens(3)
    n = shift.sum(1)
    total, avg = lp.sum(1), lp.sum(1) / n
    nll = -lp[:B][shift[:B] > 0].mean()  # cross-entropy over the chosen completion tokens
    dev = types.SimpleNamespace(device="cpu")
    t = lambda x: torch.as_tensor(x)  # noqa: E731
    for loss_type, beta, gamma, alpha in (("simpo", 2.0, 0.8, 0.0), ("sigmoid", 0.3, 0.5, 1.0)):
        me = types.SimpleNamespace(alpha=0.0, loss_type=loss_type, beta=beta, label_smoothing=0.1, simpo_gamma=gamma,
                                   accelerator=dev)
        x = avg if loss_type == "simpo" else total
        trl_losses, _, _ = CPOTrainer.cpo_loss(me, t(x[:B]), t(x[B:]))
        want = float(trl_losses.mean()) + alpha * nll
        name = "simpo" if loss_type == "simpo" else "cpo"
        got, _ = _ours([name], beta=beta, extra={"simpo_gamma": gamma, "cpo_alpha": alpha}, seed=3)
        np.testing.assert_allclose(got, want, rtol=1e-5, err_msg=name)
    me = types.SimpleNamespace(beta=0.25, accelerator=dev)
    trl_losses = ORPOTrainer.odds_ratio_loss(me, t(avg[:B]), t(avg[B:]))[0]
    got, _ = _ours(["orpo"], beta=0.25, seed=3)
    np.testing.assert_allclose(got, nll - float(trl_losses.mean()), rtol=1e-5)


def _np_formulas(x, beta, ls, tau, gamma, lam):
    pc, pr, rc, rr, nc, nr = (np.asarray(v, np.float64) for v in x[:6])
    lsig = lambda z: -np.logaddexp(0, -z)  # noqa: E731
    sig = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    lc, lr = pc - rc, pr - rr
    d = lc - lr
    z = beta * d
    return {
        "sigmoid": -(1 - ls) * lsig(z) - ls * lsig(-z), "hinge": np.maximum(0, 1 - z),
        "ipo": (lc / nc - lr / nr - 1 / (2 * beta)) ** 2,
        "exo_pair": sig(z) * (lsig(z) - np.log(1 - ls)) + sig(-z) * (lsig(-z) - np.log(ls)),
        "nca_pair": -lsig(beta * lc) - 0.5 * lsig(-beta * lc) - 0.5 * lsig(-beta * lr),
        "robust": (-(1 - ls) * lsig(z) + ls * lsig(-z)) / (1 - 2 * ls),
        "bco_pair": -lsig(beta * lc) - lsig(-beta * lr),
        "sppo_hard": (lc - 0.5 / beta) ** 2 + (lr + 0.5 / beta) ** 2,
        "aot": -(1 - ls) * lsig(beta * (np.sort(pc - pr) - np.sort(rc - rr))) - ls * lsig(
            -beta * (np.sort(pc - pr) - np.sort(rc - rr))),
        "apo_zero": 1 - sig(beta * lc) + sig(beta * lr), "apo_down": sig(beta * lc) + 1 - sig(beta * d),
        "discopop": -lsig(z) * (1 - sig(z / tau)) + np.exp(-z) * sig(z / tau),
        "sft": np.full(len(pc), -pc.sum() / nc.sum()),
        "sigmoid_norm": -lsig(beta * (lc / nc - lr / nr)),
        "dpop": -lsig(beta * (d - lam * np.maximum(0, rc - pc))),
        "simpo": -(1 - ls) * lsig(beta * (pc / nc - pr / nr) - gamma) - ls * lsig(-(beta * (pc / nc - pr / nr) - gamma)),
    }


def test_every_loss_equals_an_independent_numpy_formula():
    rng = np.random.default_rng(5)
    pc, pr, rc, rr = (jnp.asarray(rng.uniform(-30, -2, 8), jnp.float32) for _ in range(4))
    nc, nr = (jnp.asarray(rng.integers(2, 12, 8)) for _ in range(2))
    x = losses.LossInputs(pc, pr, rc, rr, nc, nr)
    hp = dict(beta=0.2, label_smoothing=0.15, discopop_tau=0.05, simpo_gamma=0.4, dpop_lambda=5.0)
    want = _np_formulas(x, 0.2, 0.15, 0.05, 0.4, 5.0)
    for name, value in want.items():
        got = losses.preference_loss(name, x, **hp)
        np.testing.assert_allclose(np.mean(np.asarray(got, np.float64)), np.mean(value), rtol=2e-5, atol=1e-6,
                                   err_msg=name)
        if name not in ("aot", "sft"):  # per pair too, where the loss is per pair
            np.testing.assert_allclose(got, value, rtol=2e-5, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("name", sorted(losses.LOSSES))
def test_gradients_equal_finite_differences_and_the_reference_gets_none(name):
    jax.config.update("jax_enable_x64", True)
    try:
        rng = np.random.default_rng(11)
        base = [rng.uniform(-3, -0.5, 5) for _ in range(4)]
        base[0] = base[2] + np.array([-0.4, -0.2, 0.3, 0.6, 0.1])
        counts = (jnp.asarray([3, 4, 5, 6, 7]), jnp.asarray([4, 4, 6, 2, 5]))
        hp = dict(beta=0.7, label_smoothing=0.1, discopop_tau=0.3, simpo_gamma=0.4, dpop_lambda=2.0, cpo_alpha=0.5)

        def total(*a):
            return jnp.sum(losses.preference_loss(name, losses.LossInputs(*a, *counts), **hp))

        check_grads_by_finite_differences(total, base, label=name)
    finally:
        jax.config.update("jax_enable_x64", False)


def test_gradients_at_the_kinks_are_stated():
    """hinge at b d = 1 and relu's kink: gradient 0 (jax.nn.relu's derivative at 0, the inactive side).
    aot at a tie in the sort: the gradient goes to one of the tied pairs, and the total is that of either order."""
    pc, pr = jnp.array([-2.0, -3.0]), jnp.array([-5.0, -4.0])
    rc, rr = jnp.array([-2.0, -3.0]), jnp.array([-3.0, -4.0])  # pair 0: b d = 0.5 x 2 = 1 exactly; pair 1: d = 0
    counts = (jnp.array([2, 2]), jnp.array([2, 2]))
    g = jax.grad(lambda a: jnp.sum(losses.preference_loss("hinge", losses.LossInputs(a, pr, rc, rr, *counts),
                                                          beta=0.5)))(pc)
    assert float(g[0]) == 0.0 and float(g[1]) == -0.5
    tie = losses.LossInputs(jnp.array([-1.0, -1.0]), jnp.array([-2.0, -2.0]), jnp.array([-1.5, -1.5]),
                            jnp.array([-2.0, -2.0]), *counts)
    ga = jax.grad(lambda a: jnp.sum(losses.preference_loss("aot", tie._replace(policy_chosen_logps=a), beta=1.0)))(
        tie.policy_chosen_logps)
    np.testing.assert_allclose(float(jnp.sum(ga)), -2 * float(jax.nn.sigmoid(-0.5)), rtol=1e-6)


def test_refusals_name_both():
    x = losses.LossInputs(*(jnp.zeros(2),) * 4, jnp.ones(2), jnp.ones(2))
    with pytest.raises(ValueError, match="f_divergence='forward_kl' is not defined for the loss 'bco_pair'"):
        losses.preference_loss("bco_pair", x, beta=0.1, f_divergence="forward_kl")
    with pytest.raises(ValueError, match="unknown loss type 'kto'"):
        losses.preference_loss("kto", x, beta=0.1)
    # A hyper-parameter a loss does not use is ignored.
    np.testing.assert_allclose(losses.preference_loss("bco_pair", x, beta=0.1, discopop_tau=9.0),
                               losses.preference_loss("bco_pair", x, beta=0.1))
