"""The preference-loss family under HF TRL 1.16's names, plus DPOP, SimPO, CPO and ORPO, as pure functions.

Each loss takes a `LossInputs` (summed completion log-probs of the policy and the frozen reference, token
counts) and keyword hyper-parameters with TRL's names, and returns a (B,) per-pair loss whose batch mean is the
loss TRL minimises (`aot` sorts over the batch and `sft` averages over the batch's tokens, as TRL does). The
reference goes through `stop_gradient`. Notation: lc = pi_c - ref_c, lr = pi_r - ref_r (the log-ratios),
sc, sr their f-divergence scores (`scores`; lc, lr for the default reverse KL), d = sc - sr, b = beta,
eps = label_smoothing, sigma the logistic function.

`preference_loss(name, inputs, **hparams)` runs one by name; a hyper-parameter a loss does not use is ignored.
`f_divergence` other than `reverse_kl` is refused by the losses TRL refuses it for.
"""

from __future__ import annotations

import inspect
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from jsmaug.losses.primitives import check_logps, dpop as _dpop

F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")


class LossInputs(NamedTuple):
    """What the trainer hands a loss, each (B,). The optional fields exist when a run asks for them."""
    policy_chosen_logps: jax.Array
    policy_rejected_logps: jax.Array
    reference_chosen_logps: jax.Array  # zeros for reference-free losses
    reference_rejected_logps: jax.Array
    chosen_num_tokens: jax.Array
    rejected_num_tokens: jax.Array
    policy_chosen_logps_unweighted: jax.Array | None = None  # without LD-DPO's token weights (for NLL terms)
    policy_rejected_logps_unweighted: jax.Array | None = None
    chosen_aligned_logps: jax.Array | None = None  # WPO: sum of log p_t - log sum_v p_v^2, no gradient
    rejected_aligned_logps: jax.Array | None = None


def _sg(x):
    return jax.lax.stop_gradient(x)


def _counts(x: LossInputs):
    return (jnp.maximum(x.chosen_num_tokens, 1).astype(jnp.float32),
            jnp.maximum(x.rejected_num_tokens, 1).astype(jnp.float32))


def _unweighted(x: LossInputs):
    c = x.policy_chosen_logps if x.policy_chosen_logps_unweighted is None else x.policy_chosen_logps_unweighted
    r = x.policy_rejected_logps if x.policy_rejected_logps_unweighted is None else x.policy_rejected_logps_unweighted
    return c, r


def logratios(x: LossInputs):
    check_logps(*x[:4])
    return x.policy_chosen_logps - _sg(x.reference_chosen_logps), x.policy_rejected_logps - _sg(x.reference_rejected_logps)


def scores(x: LossInputs, f_divergence: str = "reverse_kl", f_alpha: float = 0.5):
    """The log-ratios mapped by f'(t) of an f-divergence (f-DPO, arXiv 2309.16240; TRL's definitions):
    reverse_kl: log t; forward_kl: 1 - 1/t; js_divergence: log 2 + log sigma(log t);
    alpha_divergence: (t^(alpha-1) - 1) / (alpha - 1), clamped at exp(80), reverse KL at alpha = 1."""
    lc, lr = logratios(x)
    if f_divergence == "reverse_kl":
        return lc, lr
    if f_divergence == "forward_kl":
        return 1 - jnp.exp(-lc), 1 - jnp.exp(-lr)
    if f_divergence == "js_divergence":
        return math.log(2) + jax.nn.log_sigmoid(lc), math.log(2) + jax.nn.log_sigmoid(lr)
    if f_divergence == "alpha_divergence":
        if abs(f_alpha - 1.0) < 1e-6:
            return lc, lr
        k = f_alpha - 1.0
        return ((jnp.exp(jnp.minimum(k * lc, 80.0)) - 1.0) / k, (jnp.exp(jnp.minimum(k * lr, 80.0)) - 1.0) / k)
    raise ValueError(f"unknown f_divergence {f_divergence!r}; known: {list(F_DIVERGENCES)}")


def _smoothed_sigmoid(z, eps):
    return -(1.0 - eps) * jax.nn.log_sigmoid(z) - eps * jax.nn.log_sigmoid(-z)


def _token_mean_nll(x: LossInputs):
    """The batch's mean NLL per chosen completion token, spread so that the per-pair mean equals it (TRL's
    `sft`, and the NLL of CPO and ORPO: cross-entropy over the batch's chosen completion tokens)."""
    c, _ = _unweighted(x)
    n = x.chosen_num_tokens.astype(jnp.float32)
    return -c * c.shape[0] / jnp.maximum(jnp.sum(n), 1.0)


# ------------------------------------------------------------------------------------------------ TRL's DPOTrainer

def sigmoid(x: LossInputs, *, beta: float, label_smoothing: float = 0.0, f_divergence: str = "reverse_kl",
            f_alpha: float = 0.5):
    """DPO (Rafailov et al., arXiv 2305.18290): -(1 - eps) log sigma(b d) - eps log sigma(-b d). eps is cDPO's
    label smoothing; TRL 1.16's `sigmoid` has none, so it equals TRL at eps = 0 (the default)."""
    sc, sr = scores(x, f_divergence, f_alpha)
    return _smoothed_sigmoid(beta * (sc - sr), label_smoothing)


def hinge(x: LossInputs, *, beta: float, f_divergence: str = "reverse_kl", f_alpha: float = 0.5):
    """SLiC's hinge (Zhao et al., arXiv 2305.10425): relu(1 - b d)."""
    sc, sr = scores(x, f_divergence, f_alpha)
    return jax.nn.relu(1.0 - beta * (sc - sr))


def ipo(x: LossInputs, *, beta: float, f_divergence: str = "reverse_kl", f_alpha: float = 0.5):
    """IPO (Azar et al., arXiv 2310.12036, eq. 17) on scores averaged per completion token:
    (sc / n_c - sr / n_r - 1 / (2 b))^2."""
    sc, sr = scores(x, f_divergence, f_alpha)
    nc, nr = _counts(x)
    return (sc / nc - sr / nr - 1.0 / (2.0 * beta)) ** 2


def exo_pair(x: LossInputs, *, beta: float, label_smoothing: float, f_divergence: str = "reverse_kl",
             f_alpha: float = 0.5):
    """EXO (Ji et al., arXiv 2402.00856, eq. 16) for a pair: KL of sigma(+-b d) from (1 - eps, eps):
    sigma(b d) (log sigma(b d) - log(1 - eps)) + sigma(-b d) (log sigma(-b d) - log eps). Needs eps > 0."""
    sc, sr = scores(x, f_divergence, f_alpha)
    z = beta * (sc - sr)
    return (jax.nn.sigmoid(z) * (jax.nn.log_sigmoid(z) - math.log1p(-label_smoothing))
            + jax.nn.sigmoid(-z) * (jax.nn.log_sigmoid(-z) - jnp.log(label_smoothing)))


def nca_pair(x: LossInputs, *, beta: float):
    """NCA (Chen et al., arXiv 2402.05369) for a pair: -log sigma(b lc) - log sigma(-b lc)/2 - log sigma(-b lr)/2."""
    lc, lr = logratios(x)
    return (-jax.nn.log_sigmoid(beta * lc) - 0.5 * jax.nn.log_sigmoid(-beta * lc)
            - 0.5 * jax.nn.log_sigmoid(-beta * lr))


def robust(x: LossInputs, *, beta: float, label_smoothing: float = 0.0, f_divergence: str = "reverse_kl",
           f_alpha: float = 0.5):
    """Robust DPO (Chowdhury et al., arXiv 2403.00409), unbiased under label noise eps < 1/2:
    (-(1 - eps) log sigma(b d) + eps log sigma(-b d)) / (1 - 2 eps)."""
    sc, sr = scores(x, f_divergence, f_alpha)
    z = beta * (sc - sr)
    return (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(z) + label_smoothing * jax.nn.log_sigmoid(-z)) / (
        1.0 - 2.0 * label_smoothing)


def bco_pair(x: LossInputs, *, beta: float):
    """BCO for pairs (Jung et al., arXiv 2404.04656): -log sigma(b lc) - log sigma(-b lr)."""
    lc, lr = logratios(x)
    return -jax.nn.log_sigmoid(beta * lc) - jax.nn.log_sigmoid(-beta * lr)


def sppo_hard(x: LossInputs, *, beta: float):
    """SPPO with hard win probabilities (Wu et al., arXiv 2405.00675, eq. 4.7): (lc - 1/(2b))^2 + (lr + 1/(2b))^2."""
    lc, lr = logratios(x)
    return (lc - 0.5 / beta) ** 2 + (lr + 0.5 / beta) ** 2


def aot(x: LossInputs, *, beta: float, label_smoothing: float = 0.0):
    """AOT (Melnyk et al., arXiv 2406.05882), paired: the batch's sorted (pi_c - pi_r) minus its sorted
    (ref_c - ref_r), through the smoothed sigmoid. Batch-level: entry i is the i-th sorted pair's loss."""
    check_logps(*x[:4])
    pol = jnp.sort(x.policy_chosen_logps - x.policy_rejected_logps)
    ref = jnp.sort(_sg(x.reference_chosen_logps - x.reference_rejected_logps))
    return _smoothed_sigmoid(beta * (pol - ref), label_smoothing)


def aot_unpaired(x: LossInputs, *, beta: float, label_smoothing: float = 0.0):
    """AOT, unpaired: the batch's sorted lc minus its sorted lr, through the smoothed sigmoid (batch-level)."""
    lc, lr = logratios(x)
    return _smoothed_sigmoid(beta * (jnp.sort(lc) - jnp.sort(lr)), label_smoothing)


def apo_zero(x: LossInputs, *, beta: float):
    """APO-zero (D'Oosterlinck et al., arXiv 2408.06266, eq. 7): 1 - sigma(b lc) + sigma(b lr)."""
    lc, lr = logratios(x)
    return 1.0 - jax.nn.sigmoid(beta * lc) + jax.nn.sigmoid(beta * lr)


def apo_down(x: LossInputs, *, beta: float):
    """APO-down (arXiv 2408.06266, eq. 8): sigma(b lc) + 1 - sigma(b (lc - lr))."""
    lc, lr = logratios(x)
    return jax.nn.sigmoid(beta * lc) + 1.0 - jax.nn.sigmoid(beta * (lc - lr))


def discopop(x: LossInputs, *, beta: float, discopop_tau: float = 0.05, f_divergence: str = "reverse_kl",
             f_alpha: float = 0.5):
    """DiscoPOP (Chan Lu et al., arXiv 2406.08414, eq. 5), z = b d, m = sigma(z / tau):
    -log sigma(z) (1 - m) + exp(-z) m."""
    sc, sr = scores(x, f_divergence, f_alpha)
    z = beta * (sc - sr)
    m = jax.nn.sigmoid(z / discopop_tau)
    return -jax.nn.log_sigmoid(z) * (1.0 - m) + jnp.exp(-z) * m


def sft(x: LossInputs, **_):
    """NLL of the chosen completions, averaged over the batch's chosen completion tokens (TRL's `sft`; no
    reference). Batch-level: every entry holds its pair's share, so the batch mean is the token mean."""
    return _token_mean_nll(x)


def sigmoid_norm(x: LossInputs, *, beta: float, f_divergence: str = "reverse_kl", f_alpha: float = 0.5):
    """Length-normalised DPO (TRL's `sigmoid_norm`): -log sigma(b (sc / n_c - sr / n_r))."""
    sc, sr = scores(x, f_divergence, f_alpha)
    nc, nr = _counts(x)
    return -jax.nn.log_sigmoid(beta * (sc / nc - sr / nr))


# ------------------------------------------------------------------------------------------------ beyond DPOTrainer

def dpop(x: LossInputs, *, beta: float, dpop_lambda: float):
    """DPO-Positive (Pal et al., arXiv 2402.13228): -log sigma(b (lc - lr - lambda max(0, ref_c - pi_c)));
    its gradient at the tie pi_c == ref_c is DPO's (see `primitives.dpop`)."""
    return _dpop(*x[:4], beta=beta, lam=dpop_lambda)


def simpo(x: LossInputs, *, beta: float, simpo_gamma: float = 0.5, label_smoothing: float = 0.0):
    """SimPO (Meng et al., arXiv 2405.14734), reference-free, on length-averaged log-probs a_c, a_r:
    -(1 - eps) log sigma(b (a_c - a_r) - gamma) - eps log sigma(-(b (a_c - a_r) - gamma)) (TRL's CPOTrainer
    with loss_type=simpo, cpo_alpha=0)."""
    c, r = _unweighted(x)
    nc, nr = _counts(x)
    return _smoothed_sigmoid(beta * (c / nc - r / nr - simpo_gamma / beta), label_smoothing)


def cpo(x: LossInputs, *, beta: float, cpo_alpha: float = 1.0, label_smoothing: float = 0.0):
    """CPO (Xu et al., arXiv 2401.08417), reference-free: the smoothed sigmoid of b (pi_c - pi_r) on summed
    log-probs, plus cpo_alpha x the batch's NLL per chosen completion token (TRL's CPOTrainer, loss_type=sigmoid)."""
    c, r = _unweighted(x)
    return _smoothed_sigmoid(beta * (c - r), label_smoothing) + cpo_alpha * _token_mean_nll(x)


def _log1mexp(a):
    """log(1 - exp(a)) for a < 0, accurate on both sides of -log 2."""
    return jnp.where(a > -math.log(2), jnp.log(-jnp.expm1(a)), jnp.log1p(-jnp.exp(a)))


def orpo(x: LossInputs, *, beta: float):
    """ORPO (Hong et al., arXiv 2403.07691, eqs. 4 and 7), reference-free, on length-averaged log-probs:
    the batch's NLL per chosen completion token - b log sigma(log odds), log odds = (a_c - a_r) -
    (log(1 - e^a_c) - log(1 - e^a_r)) (TRL's ORPOTrainer; beta is its lambda)."""
    c, r = _unweighted(x)
    nc, nr = _counts(x)
    ac, ar = c / nc, r / nr
    log_odds = (ac - ar) - (_log1mexp(ac) - _log1mexp(ar))
    return _token_mean_nll(x) - beta * jax.nn.log_sigmoid(log_odds)


def wpo_weights(x: LossInputs) -> jax.Array:
    """WPO's pair weights (Zhou et al., arXiv 2406.11827, eq. 2; TRL's use_weighting): exp of each completion's
    mean aligned log-prob, chosen times rejected, without a gradient."""
    nc, nr = _counts(x)
    return _sg(jnp.exp(x.chosen_aligned_logps / nc) * jnp.exp(x.rejected_aligned_logps / nr))


# ------------------------------------------------------------------------------------------------ the table

class LossSpec(NamedTuple):
    fn: Callable[..., jax.Array]
    needs_reference: bool = True
    f_divergence: bool = False  # TRL allows f_divergence other than reverse_kl with it
    batch_level: bool = False  # sorts or averages over the batch


LOSSES: dict[str, LossSpec] = {
    "sigmoid": LossSpec(sigmoid, f_divergence=True), "hinge": LossSpec(hinge, f_divergence=True),
    "ipo": LossSpec(ipo, f_divergence=True), "exo_pair": LossSpec(exo_pair, f_divergence=True),
    "nca_pair": LossSpec(nca_pair), "robust": LossSpec(robust, f_divergence=True), "bco_pair": LossSpec(bco_pair),
    "sppo_hard": LossSpec(sppo_hard), "aot": LossSpec(aot, batch_level=True),
    "aot_unpaired": LossSpec(aot_unpaired, batch_level=True), "apo_zero": LossSpec(apo_zero),
    "apo_down": LossSpec(apo_down), "discopop": LossSpec(discopop, f_divergence=True),
    "sft": LossSpec(sft, needs_reference=False, f_divergence=True, batch_level=True),
    "sigmoid_norm": LossSpec(sigmoid_norm, f_divergence=True),
    "dpop": LossSpec(dpop), "simpo": LossSpec(simpo, needs_reference=False),
    "cpo": LossSpec(cpo, needs_reference=False, batch_level=True),
    "orpo": LossSpec(orpo, needs_reference=False, batch_level=True),
}
ALIASES = {"dpo": "sigmoid"}


def lookup(name: str) -> LossSpec:
    spec = LOSSES.get(ALIASES.get(name, name))
    if spec is None:
        raise ValueError(f"unknown loss type {name!r}; known: {sorted(LOSSES) + sorted(ALIASES)}")
    return spec


def needs_reference(name: str) -> bool:
    return lookup(name).needs_reference


def hyperparameters(fn: Callable) -> set[str]:
    """The keyword hyper-parameters a loss function takes."""
    params = list(inspect.signature(fn).parameters.values())[1:]
    return {p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}


def preference_loss(name: str, inputs: LossInputs, **hparams) -> jax.Array:
    """The (B,) per-pair loss `name` (a TRL name, `dpo`, `dpop`, `simpo`, `cpo` or `orpo`). Hyper-parameters a
    loss does not take are ignored; `f_divergence` other than `reverse_kl` is refused by a loss that TRL
    refuses it for; `wpo=True` multiplies by WPO's pair weights."""
    spec = lookup(name)
    f_div = hparams.get("f_divergence", "reverse_kl")
    if f_div != "reverse_kl" and not spec.f_divergence:
        raise ValueError(f"f_divergence={f_div!r} is not defined for the loss {name!r}; TRL allows it with "
                         f"{sorted(n for n, s in LOSSES.items() if s.f_divergence)}")
    taken = hyperparameters(spec.fn)
    out = spec.fn(inputs, **{k: v for k, v in hparams.items() if k in taken})
    return out * wpo_weights(inputs) if hparams.get("wpo") else out
