"""Evaluating a trained policy: preference accuracy and implicit rewards, and multiple-choice scoring.

Everything here reduces to one primitive, `completion_logps`: the summed log-probability of a continuation
given its context, computed in fixed-shape batches (rows padded to a few bucket lengths, the last batch padded
with copies) by the same jitted function the trainer uses for its policy logps.

Multiple choice follows lm-evaluation-harness (`output_type: multiple_choice`):
  - the request for choice i is (context, delimiter + choice_i) with delimiter " ";
  - trailing spaces of the context move to the front of the continuation, the context is tokenised alone
    (with BOS) and the continuation tokens are those of tokenise(context + continuation) after the context's;
  - acc      = [argmax_i ll_i == gold]
  - acc_norm = [argmax_i ll_i / len(choice_i) == gold], len in characters of the choice (without delimiter).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np

from jsmaug.data import batches as data_lib
from jsmaug.train import step as step_lib
from jsmaug.models.config import MixtralConfig


def load_model(path: str | Path, dtype: str | None = None) -> tuple[MixtralConfig, Any]:
    """(config, params) from a Hugging Face folder (config.json + safetensors), a converter checkpoint
    (model_config.json + params/) or a training workdir (its latest checkpoint)."""
    from jsmaug.train import checkpoint as ckpt
    from jsmaug import hf

    path = Path(path)
    if not path.exists():
        raise ckpt.CheckpointError(f"{path}: no such model folder")
    if (path / "config.json").exists() and any(path.glob("*.safetensors")):
        return hf.load(path, dtype=dtype)
    config, params = ckpt.load_params(path)
    if dtype is not None:
        params = jax.tree.map(lambda x: x.astype(dtype), params)
        config = config.replace(param_dtype=dtype)
    return config, params


def model_tokenizer_path(model_path: str | Path) -> str | None:
    """The tokenizer a model folder carries (its tokenizer.json, else its tokenizer.model): in an HF folder or
    converter checkpoint, in `hf/` of a training workdir, or the one a workdir trained with. None when it has
    none (the caller then uses Mixtral's). `jsmaug.data.tokenizer_folder.model_tokenizer_path`."""
    from jsmaug.data import tokenizer_folder

    return tokenizer_folder.model_tokenizer_path(model_path)


@functools.lru_cache(maxsize=None)
def _logps_fn(config: MixtralConfig, chunk_size: int):
    def fn(params, batch):
        seq, _, _ = step_lib.policy_logps(config, params, batch, chunk_size)
        return seq.logps, seq.num_tokens
    return jax.jit(fn)


def completion_logps(config: MixtralConfig, params, items: Sequence[tuple[np.ndarray, np.ndarray]],
                     batch_size: int = 16, chunk_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Summed log p(continuation | context) and the continuation's token count for every (context_ids,
    continuation_ids) pair, as float64 / int arrays of shape (N,)."""
    if not items:
        return np.zeros(0), np.zeros(0, np.int64)
    for i, (ctx, cont) in enumerate(items):
        if len(ctx) < 1 or len(cont) < 1:
            raise ValueError(f"item {i}: context and continuation need at least one token each")
    longest = max(len(c) + len(x) for c, x in items)
    if longest > config.max_position_embeddings:
        raise ValueError(f"an item of {longest} tokens exceeds max_position_embeddings="
                         f"{config.max_position_embeddings}")
    buckets = data_lib.power_of_two_buckets(longest)
    fn = _logps_fn(config, chunk_size)
    # Sorting by length keeps similar lengths together (fewer padded tokens, fewer bucket shapes).
    order = np.argsort([len(c) + len(x) for c, x in items], kind="stable")
    logps, ntok = np.zeros(len(items)), np.zeros(len(items), np.int64)
    for start in range(0, len(items), batch_size):
        idx = order[start:start + batch_size]
        chunk = [items[i] for i in idx]
        length = next(b for b in buckets if b >= max(len(c) + len(x) for c, x in chunk))
        rows = [data_lib.completion_row(np.asarray(c, np.int32), np.asarray(x, np.int32), length) for c, x in chunk]
        batch = data_lib.stack_rows(rows + [rows[0]] * (batch_size - len(rows)))
        lp, nt = jax.device_get(fn(params, batch))
        logps[idx] = np.asarray(lp)[:len(idx)]
        ntok[idx] = np.asarray(nt)[:len(idx)]
    return logps, ntok


# ------------------------------------------------------------------------------------------------ preference

def preference_eval(config: MixtralConfig, params, examples: Sequence[dict], ref_params=None, *, beta: float = 0.3,
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


# ------------------------------------------------------------------------------------------------ multiple choice

CONTEXT_KEYS = ("query", "question", "context", "prompt")
GOLD_KEYS = ("gold", "label", "answer")


def read_multiple_choice(path: str | Path) -> list[dict[str, Any]]:
    """JSONL rows {"query"|"question"|"context"|"prompt": str, "choices": [str, ...], "gold"|"label"|"answer": int}.
    Errors name the file and line."""
    out = []
    for where, row in data_lib.read_rows(path):
        if isinstance(row, Exception):
            raise row
        if not isinstance(row, dict):
            raise data_lib.DataError(f"{where}: a row must be an object")
        ctx_key = next((k for k in CONTEXT_KEYS if k in row), None)
        gold_key = next((k for k in GOLD_KEYS if k in row), None)
        if ctx_key is None or not isinstance(row[ctx_key], str):
            raise data_lib.DataError(f"{where}: needs a string field, one of {list(CONTEXT_KEYS)}")
        choices = row.get("choices")
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            raise data_lib.DataError(f"{where}: 'choices' must be a list of at least 2 non-empty strings")
        gold = row.get(gold_key) if gold_key else None
        if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(choices):
            raise data_lib.DataError(f"{where}: needs an integer {'/'.join(GOLD_KEYS)} in [0, {len(choices)})")
        out.append({"where": where, "context": row[ctx_key], "choices": choices, "gold": gold})
    if not out:
        raise data_lib.DataError(f"{path}: no rows")
    return out


def encode_pair(tok: data_lib.Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-evaluation-harness's split of (context, continuation) into token ids (BOS before the context)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tok.encode(context + continuation)
    ctx = tok.encode(context)
    return tok.prefix_ids + ctx, whole[len(ctx):]


def multiple_choice_eval(config: MixtralConfig, params, tok: data_lib.Tokenizer, rows: Sequence[dict], *,
                         delimiter: str = " ", batch_size: int = 16, chunk_size: int = 64) -> dict[str, Any]:
    """acc and acc_norm over `read_multiple_choice` rows, plus every row's log-likelihoods."""
    items, owner = [], []
    for r, row in enumerate(rows):
        for choice in row["choices"]:
            ctx, cont = encode_pair(tok, row["context"], delimiter + choice)
            if not cont:
                raise data_lib.DataError(f"{row.get('where', r)}: choice {choice!r} has no tokens")
            items.append((ctx, cont))
            owner.append(r)
    lls, _ = completion_logps(config, params, items, batch_size, chunk_size)
    acc = acc_norm = 0.0
    per_row = []
    pos = 0
    for row in rows:
        k = len(row["choices"])
        ll = lls[pos:pos + k]
        pos += k
        lengths = np.array([float(len(c)) for c in row["choices"]])
        hit, hit_norm = int(np.argmax(ll) == row["gold"]), int(np.argmax(ll / lengths) == row["gold"])
        acc += hit
        acc_norm += hit_norm
        per_row.append({"lls": ll.tolist(), "gold": row["gold"], "acc": hit, "acc_norm": hit_norm})
    n = len(rows)
    return {"rows": n, "acc": acc / n, "acc_norm": acc_norm / n, "per_row": per_row}


# ------------------------------------------------------------------------------------------------ reporting

def summary_table(results: dict[str, dict[str, Any]]) -> str:
    """A plain-text table of every scalar metric of every evaluated file."""
    lines = []
    for name, res in results.items():
        lines.append(name)
        for k, v in res.items():
            if isinstance(v, (int, float)):
                lines.append(f"  {k:<28} {v:>12.4f}" if isinstance(v, float) else f"  {k:<28} {v:>12d}")
    return "\n".join(lines)


def write_json(path: str | Path, obj: Any) -> None:
    """Writes JSON atomically (temp file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    tmp.replace(path)
