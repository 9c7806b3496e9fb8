"""The `loss` section made into the function a step minimises: one loss or a weighted sum of several, TRL's
names or your own function, f-divergences, LD-DPO and WPO; every combination checked before the run starts.

    loss:
      type: dpop                       # a name, a list of names, or "module:function" (your own loss)
      weights: []                      # one per type (default 1 each): TRL's loss_weights (MPO, RPO, ...)
      beta: 0.3
      f_divergence: reverse_kl         # forward_kl | js_divergence | alpha_divergence, with f_alpha
      ld_alpha: null                   # LD-DPO: the tail beyond the shorter completion weighted by ld_alpha
      wpo: false                       # WPO's pair weights (TRL's use_weighting)
      params: {}                       # your own loss's keyword arguments

Your own loss is a function `fn(inputs: jsmaug.losses.LossInputs, **params) -> (B,) array`, importable from
the Python path (the working directory is on it). It runs with the reference unless it sets
`fn.needs_reference = False`. A missing module or function, a wrong signature or a parameter it does not take
is an error that names it.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from typing import Any, Callable

import jax
import jax.numpy as jnp

from jsmaug import losses
from jsmaug.models.config import ConfigError

# Hyper-parameters of the built-in losses that the `loss` section carries (TRL's names).
HPARAMS = ("beta", "label_smoothing", "dpop_lambda", "discopop_tau", "f_divergence", "f_alpha", "simpo_gamma",
           "cpo_alpha")


@dataclasses.dataclass(frozen=True)
class Term:
    name: str  # as configured ("sigmoid", "dpo", "mypkg.losses:my_loss")
    fn: Callable[..., jax.Array]
    kwargs: dict
    weight: float
    needs_reference: bool
    batch_level: bool


@dataclasses.dataclass(frozen=True)
class Objective:
    terms: tuple[Term, ...]
    wpo: bool
    ld_alpha: float | None

    @property
    def needs_reference(self) -> bool:
        return any(t.needs_reference for t in self.terms)

    def __call__(self, inputs: losses.LossInputs) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(the (B,) weighted per-pair loss, each term's batch mean by name)."""
        weights = losses.wpo_weights(inputs) if self.wpo else None
        total, parts = 0.0, {}
        for t in self.terms:
            value = jnp.asarray(t.fn(inputs, **t.kwargs), jnp.float32)
            if value.shape != inputs.policy_chosen_logps.shape:
                raise ValueError(f"loss {t.name} returned shape {value.shape}; a loss returns one value per pair, "
                                 f"{inputs.policy_chosen_logps.shape}")
            if weights is not None:
                value = value * weights
            parts[t.name] = jnp.mean(value)
            total = total + t.weight * value
        return total, parts


def _user_loss(name: str) -> Callable:
    module_name, _, fn_name = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(f"loss.type={name}: cannot import module {module_name!r} ({err}); it must be on the "
                          "Python path (the working directory or PYTHONPATH)") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ConfigError(f"loss.type={name}: module {module_name!r} has no function {fn_name!r}")
    params = list(inspect.signature(fn).parameters.values())
    if not params or params[0].kind not in (params[0].POSITIONAL_ONLY, params[0].POSITIONAL_OR_KEYWORD):
        raise ConfigError(f"loss.type={name}: {fn_name} must take the LossInputs as its first positional argument: "
                          "def my_loss(inputs, **params) -> (B,) array")
    return fn


def _check_params(name: str, fn: Callable, params: dict) -> None:
    sig = inspect.signature(fn)
    rest = list(sig.parameters.values())[1:]
    if any(p.kind == p.VAR_KEYWORD for p in rest):
        return
    names = {p.name for p in rest}
    unknown = sorted(set(params) - names)
    if unknown:
        raise ConfigError(f"loss.params: {name} takes no parameter {unknown[0]!r}; it takes {sorted(names)}")
    missing = [p.name for p in rest if p.default is p.empty and p.name not in params]
    if missing:
        raise ConfigError(f"loss.params: {name} needs {missing[0]!r}")


def objective(loss_cfg) -> Objective:
    """The checked Objective of a `loss` section (run_config.LossSection); `ConfigError` names what is wrong."""
    names = [loss_cfg.type] if isinstance(loss_cfg.type, str) else list(loss_cfg.type)
    if not names:
        raise ConfigError("loss.type: give a loss name, a list of names, or module:function")
    weights = list(loss_cfg.weights) or [1.0] * len(names)
    if len(weights) != len(names):
        raise ConfigError(f"loss.weights: {len(weights)} weights for {len(names)} losses {names}")
    if loss_cfg.f_divergence not in losses.F_DIVERGENCES:
        raise ConfigError(f"loss.f_divergence: must be one of {list(losses.F_DIVERGENCES)}, got "
                          f"{loss_cfg.f_divergence!r}")
    hparams = {k: getattr(loss_cfg, k) for k in HPARAMS}
    terms = []
    for name, weight in zip(names, weights):
        if ":" in name:
            fn = _user_loss(name)
            _check_params(name, fn, dict(loss_cfg.params))
            terms.append(Term(name, fn, dict(loss_cfg.params), float(weight),
                              bool(getattr(fn, "needs_reference", True)), False))
            continue
        try:
            spec = losses.lookup(name)
        except ValueError as err:
            raise ConfigError(f"loss.type: {err}") from None
        if loss_cfg.f_divergence != "reverse_kl" and not spec.f_divergence:
            raise ConfigError(f"loss.f_divergence={loss_cfg.f_divergence} is not defined for loss.type={name}; TRL "
                              f"allows it with {sorted(n for n, s in losses.LOSSES.items() if s.f_divergence)}")
        taken = losses.hyperparameters(spec.fn)
        terms.append(Term(name, spec.fn, {k: v for k, v in hparams.items() if k in taken}, float(weight),
                          spec.needs_reference, spec.batch_level))
    _check_combinations(loss_cfg, [t.name for t in terms])
    return Objective(tuple(terms), bool(loss_cfg.wpo), loss_cfg.ld_alpha)


def _check_combinations(loss_cfg, names: list[str]) -> None:
    canonical = {losses.ALIASES.get(n, n) for n in names}
    if "exo_pair" in canonical and not 0.0 < loss_cfg.label_smoothing < 1.0:
        raise ConfigError("loss.label_smoothing: exo_pair needs 0 < label_smoothing < 1 (its target is "
                          f"(1 - eps, eps)), got {loss_cfg.label_smoothing}")
    if "robust" in canonical and not 0.0 <= loss_cfg.label_smoothing < 0.5:
        raise ConfigError(f"loss.label_smoothing: robust needs 0 <= label_smoothing < 0.5, got "
                          f"{loss_cfg.label_smoothing}")
    if loss_cfg.wpo and canonical & {"aot", "aot_unpaired"}:
        raise ConfigError("loss.wpo: not defined with aot / aot_unpaired (they sort the batch, which would "
                          "misalign the pair weights; TRL refuses it too)")
    free = canonical & {"simpo", "cpo", "orpo"}
    if loss_cfg.ld_alpha is not None:
        if not 0.0 <= loss_cfg.ld_alpha <= 1.0:
            raise ConfigError(f"loss.ld_alpha: must be in [0, 1], got {loss_cfg.ld_alpha}")
        if free:
            raise ConfigError(f"loss.ld_alpha: LD-DPO is defined for the DPOTrainer losses; {sorted(free)[0]} takes "
                              "length-averaged or summed log-probs without it")


def describe(obj: Objective) -> str:
    """One line for the run's log."""
    parts = [f"{t.weight:g} x {t.name}" if len(obj.terms) > 1 else t.name for t in obj.terms]
    extra = ([f"ld_alpha={obj.ld_alpha:g}"] if obj.ld_alpha is not None else []) + (["wpo"] if obj.wpo else [])
    return " + ".join(parts) + (f" ({', '.join(extra)})" if extra else "") + \
        ("" if obj.needs_reference else "; reference-free: no reference weights, no reference forward")


def hparams_doc() -> dict[str, Any]:
    """name -> hyper-parameters it takes, for the docs and errors."""
    return {n: sorted(losses.hyperparameters(s.fn)) for n, s in losses.LOSSES.items()}
