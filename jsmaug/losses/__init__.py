"""Preference losses as pure functions (optax style).

`primitives`: the formulas on arrays (DPOP, DPO's sigmoid with cDPO smoothing, IPO, hinge, NLL) and the metrics
trainers log. `family`: every loss of HF TRL 1.16's DPOTrainer under TRL's names, plus DPOP, SimPO, CPO and
ORPO, on `LossInputs`, with `preference_loss(name, inputs, **hparams)`. Log-probabilities themselves come from
`jsmaug.models.logps`.
"""

from jsmaug.losses.family import (ALIASES, F_DIVERGENCES, LOSSES, LossInputs, LossSpec, hyperparameters,
                                  logratios, lookup, needs_reference, preference_loss, scores, wpo_weights)
from jsmaug.losses.primitives import dpo_sigmoid, dpop, dpop_penalty, hinge, ipo, nll, preference_metrics

__all__ = ["ALIASES", "F_DIVERGENCES", "LOSSES", "LossInputs", "LossSpec", "hyperparameters", "logratios", "lookup",
           "needs_reference", "preference_loss", "scores", "wpo_weights", "dpo_sigmoid", "dpop", "dpop_penalty",
           "hinge", "ipo", "nll", "preference_metrics"]
