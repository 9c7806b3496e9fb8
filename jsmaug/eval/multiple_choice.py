"""Multiple choice as lm-evaluation-harness scores it (`output_type: multiple_choice`, ARC / HellaSwag style).

  - with k shots, the context is k examples `query + " " + choices[gold] + "\\n\\n"` (drawn as lm-eval's default
    sampler draws them, `jsmaug.eval.fewshot`) followed by the row's query;
  - the request for choice i is (context, delimiter + choice_i) with delimiter " ";
  - trailing spaces of the context move to the front of the continuation, the context is tokenised alone
    (with BOS) and the continuation tokens are those of tokenise(context + continuation) after the context's;
  - acc      = [argmax_i ll_i == gold]
  - acc_norm = [argmax_i ll_i / len(choice_i) == gold], len in characters of the choice (without delimiter).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from jsmaug.data import files as files_lib
from jsmaug.data.tokenizer import Tokenizer
from jsmaug.errors import DataError
from jsmaug.eval import fewshot as fewshot_lib
from jsmaug.eval.logprobs import completion_logps
from jsmaug.models.config import ModelConfig

CONTEXT_KEYS = ("query", "question", "context", "prompt")
GOLD_KEYS = ("gold", "label", "answer")


def read_multiple_choice(path: str | Path) -> list[dict[str, Any]]:
    """JSONL rows {"query"|"question"|"context"|"prompt": str, "choices": [str, ...], "gold"|"label"|"answer": int}.
    Errors name the file and line."""
    out = []
    for where, row in files_lib.read_rows(path):
        if isinstance(row, Exception):
            raise row
        if not isinstance(row, dict):
            raise DataError(f"{where}: a row must be an object")
        ctx_key = next((k for k in CONTEXT_KEYS if k in row), None)
        gold_key = next((k for k in GOLD_KEYS if k in row), None)
        if ctx_key is None or not isinstance(row[ctx_key], str):
            raise DataError(f"{where}: needs a string field, one of {list(CONTEXT_KEYS)}")
        choices = row.get("choices")
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            raise DataError(f"{where}: 'choices' must be a list of at least 2 non-empty strings")
        gold = row.get(gold_key) if gold_key else None
        if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(choices):
            raise DataError(f"{where}: needs an integer {'/'.join(GOLD_KEYS)} in [0, {len(choices)})")
        out.append({"where": where, "context": row[ctx_key], "choices": choices, "gold": gold})
    if not out:
        raise DataError(f"{path}: no rows")
    return out


def encode_pair(tok: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-evaluation-harness's split of (context, continuation) into token ids (BOS before the context)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tok.encode(context + continuation)
    ctx = tok.encode(context)
    return tok.prefix_ids + ctx, whole[len(ctx):]


def fewshot_contexts(rows: Sequence[dict], num_fewshot: int = 0, fewshot_rows: Sequence[dict] | None = None,
                     seed: int = fewshot_lib.LM_EVAL_FEWSHOT_SEED) -> list[str]:
    """Every row's context with its k examples before it, as lm-eval's plain-text few-shot context."""
    pool, picks = fewshot_lib.pick_examples(len(rows), num_fewshot, fewshot_rows, seed=seed)
    return [fewshot_lib.render(fewshot_lib.turns(
        [(pool[i]["context"], pool[i]["choices"][pool[i]["gold"]]) for i in pick], row["context"]))
        for row, pick in zip(rows, picks)]


def multiple_choice_eval(config: ModelConfig, params, tok: Tokenizer, rows: Sequence[dict], *,
                         delimiter: str = " ", batch_size: int = 16, chunk_size: int = 64, num_fewshot: int = 0,
                         fewshot_rows: Sequence[dict] | None = None) -> dict[str, Any]:
    """acc and acc_norm over `read_multiple_choice` rows, plus every row's log-likelihoods."""
    contexts = fewshot_contexts(rows, num_fewshot, fewshot_rows)
    items = []
    for r, (row, context) in enumerate(zip(rows, contexts)):
        for choice in row["choices"]:
            ctx, cont = encode_pair(tok, context, delimiter + choice)
            if not cont:
                raise DataError(f"{row.get('where', r)}: choice {choice!r} has no tokens")
            items.append((ctx, cont))
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
    return {"rows": n, "num_fewshot": num_fewshot, "acc": acc / n, "acc_norm": acc_norm / n, "per_row": per_row}
