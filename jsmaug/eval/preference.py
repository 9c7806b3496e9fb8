"""Preference pairs: the policy's chosen / rejected log-probs, and with a reference the implicit rewards."""

from __future__ import annotations

from typing import Any, Sequence

from jsmaug.eval.logprobs import completion_logps
from jsmaug.models.config import ModelConfig


def preference_eval(config: ModelConfig, params, examples: Sequence[dict], ref_params=None, *, beta: float = 0.3,
                    batch_size: int = 16, chunk_size: int = 64) -> dict[str, Any]:
    """Metrics on tokenised pairs (`data.prepare` output). Always: mean chosen / rejected logps and
    `logps/accuracy` (chosen more likely than rejected). With a reference model: the implicit rewards
    beta * (policy - reference) and their accuracy and margin (TRL's names), as the trainer logs them."""
    if not examples:
        raise ValueError("no preference pairs to evaluate (the file is empty, or every pair was dropped)")
    items = [(ex["prompt"], ex["chosen"]) for ex in examples] + [(ex["prompt"], ex["rejected"]) for ex in examples]
    lp, nt = completion_logps(config, params, items, batch_size, chunk_size)
    n = len(examples)
    pc, pr = lp[:n], lp[n:]
    out: dict[str, Any] = {"pairs": n, "logps/chosen": float(pc.mean()), "logps/rejected": float(pr.mean()),
                           "logps/accuracy": float((pc > pr).mean()),
                           "logps/chosen_per_token": float((pc / nt[:n]).mean())}
    per_pair: dict[str, list] = {"policy_chosen": pc.tolist(), "policy_rejected": pr.tolist()}
    if ref_params is not None:
        rlp, _ = completion_logps(config, ref_params, items, batch_size, chunk_size)
        rc, rr = rlp[:n], rlp[n:]
        # The same quantities as losses.preference_metrics, in float64 over the whole split.
        reward_c, reward_r = beta * (pc - rc), beta * (pr - rr)
        out.update({"rewards/chosen": float(reward_c.mean()), "rewards/rejected": float(reward_r.mean()),
                    "rewards/accuracies": float((reward_c > reward_r).mean()),
                    "rewards/margins": float((reward_c - reward_r).mean()),
                    "reference/logps/chosen": float(rc.mean()), "reference/logps/rejected": float(rr.mean()),
                    "chosen_logps_decreased": float((pc < rc).mean())})
        per_pair.update(reference_chosen=rc.tolist(), reference_rejected=rr.tolist())
    out["per_pair"] = per_pair
    return out
