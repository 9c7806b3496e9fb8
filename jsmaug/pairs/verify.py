"""Problems and the verifiers that grade a model's samples for `jsmaug pairs sample`.

A problem is one row of the input file (JSONL, a JSON array or Parquet). Its prompt is the row's `prompt` (a
string, or a list of chat messages) when it has one; otherwise it is made from the row by the verifier's kind:

  gsm8k, gsm8k_strict   `Question: {question}\\nAnswer:` (lm-eval's gsm8k prompt); `answer` must end `#### N`
  mc                    the question (`query`/`question`/`context`, a trailing `Answer:` dropped), then one line
                        `A. choice` per choice, then `Answer:`; `choices` and `gold` (an index) as the
                        evaluation's multiple-choice rows have them
  module:function       `prompt`, or `question` as gsm8k's prompt

A verifier maps (problem row, completion text) to a score; a sample is correct when its score is at least the
threshold (1 by default), so True/False work as 1/0:

  gsm8k         lm-eval's `flexible-extract`: the completion's last number, exact match against `#### N` after
                the task's normalisation (`jsmaug.eval.gsm8k`: the same functions the generation-scored
                evaluation uses)
  gsm8k_strict  lm-eval's `strict-match`: the first `#### N` in the completion
  mc            the answer letter (`B`, `(B)`, `B.`, `B)`, `answer is B`), or else the choice whose text the
                completion starts with (case and punctuation ignored; the longest such choice); 0 when neither
  module:function   a function of yours, `fn(problem: dict, completion: str) -> bool | float`, imported from a
                module on the Python path or from a file (`path/to/check.py:fn`). An exception or a return that
                is not a number stops the run with an error naming the problem.

An unparsable completion (no number, no letter) scores 0: it is a wrong sample.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import numbers
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from jsmaug.data import files as files_lib
from jsmaug.errors import DataError
from jsmaug.eval import gsm8k as gsm8k_lib

BUILT_IN = ("gsm8k", "gsm8k_strict", "mc")
LETTERS = string.ascii_uppercase
MC_CONTEXT_KEYS = ("query", "question", "context")
MC_GOLD_KEYS = ("gold", "label", "answer")


@dataclass
class Problem:
    index: int  # 0-based row number over the input file (the sampling seed's key)
    where: str  # 'file:line N'
    row: dict  # the row as read, given to the verifier
    prompt: str | list  # the training-format prompt (a string, or chat messages)


# ------------------------------------------------------------------------------------------------ prompts

def _mc_fields(row: dict, where: str) -> tuple[str, list[str], int]:
    ctx_key = next((k for k in MC_CONTEXT_KEYS if isinstance(row.get(k), str)), None)
    choices, gold_key = row.get("choices"), next((k for k in MC_GOLD_KEYS if k in row), None)
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise DataError(f"{where}: 'choices' must be a list of at least 2 non-empty strings (the mc verifier)")
    if len(choices) > len(LETTERS):
        raise DataError(f"{where}: at most {len(LETTERS)} choices")
    gold = row.get(gold_key) if gold_key else None
    if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(choices):
        raise DataError(f"{where}: needs an integer {'/'.join(MC_GOLD_KEYS)} in [0, {len(choices)}) (the mc "
                        "verifier)")
    if ctx_key is None and "prompt" not in row:
        raise DataError(f"{where}: needs a string field, one of {list(MC_CONTEXT_KEYS)} or 'prompt'")
    return (row[ctx_key] if ctx_key else ""), choices, gold


def mc_prompt(question: str, choices: list[str]) -> str:
    question = question.rstrip()
    if question.endswith("Answer:"):
        question = question[:-len("Answer:")].rstrip()
    lines = [f"{LETTERS[i]}. {c}" for i, c in enumerate(choices)]
    return "\n".join([question, *lines, "Answer:"])


def _gsm8k_answer(row: dict, where: str) -> None:
    if not isinstance(row.get("answer"), str) or "#### " not in row["answer"]:
        raise DataError(f"{where}: needs a string 'answer' ending with '#### N' (GSM8K's layout, which the "
                        "gsm8k verifiers grade against)")


def _prompt(row: dict, where: str, kind: str) -> str | list:
    if kind in ("gsm8k", "gsm8k_strict"):
        _gsm8k_answer(row, where)
    if kind == "mc":
        question, choices, _ = _mc_fields(row, where)
    prompt = row.get("prompt")
    if isinstance(prompt, str) and prompt.strip():
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                                   and isinstance(m.get("content"), str) for m in prompt):
        return prompt
    if prompt is not None:
        raise DataError(f"{where}: 'prompt' must be a non-empty string or a list of {{role, content}} messages")
    if kind == "mc":
        return mc_prompt(question, choices)
    if isinstance(row.get("question"), str) and row["question"].strip():
        return gsm8k_lib.doc_to_text(row)
    raise DataError(f"{where}: needs a 'prompt' (or a 'question') field")


def read_problems(path: str | Path, kind: str, max_rows: int | None = None) -> list[Problem]:
    """Every row of `path` as a Problem (module docstring); `kind` is a built-in verifier's name or 'user'.
    A bad row raises a DataError naming the file and line."""
    out = []
    for n, (where, row) in enumerate(files_lib.read_rows(path)):
        if max_rows is not None and n >= max_rows:
            break
        if isinstance(row, Exception):
            raise row
        if not isinstance(row, dict):
            raise DataError(f"{where}: a problem must be a JSON object")
        out.append(Problem(n, where, row, _prompt(row, where, kind)))
    if not out:
        raise DataError(f"{path}: no problems")
    return out


# ------------------------------------------------------------------------------------------------ verifiers

def gsm8k_score(row: dict, completion: str) -> float:
    return float(gsm8k_lib.exact_match(gsm8k_lib.extract_flexible(completion), row["answer"]))


def gsm8k_strict_score(row: dict, completion: str) -> float:
    return float(gsm8k_lib.exact_match(gsm8k_lib.extract_strict(completion), row["answer"]))


_LETTER_AT_START = re.compile(r"^\s*\(?([A-Z])(?:[).:,]|\s|$)")
_ANSWER_IS = re.compile(r"answer\s+is\s*:?\s*\(?([A-Z])\b", re.IGNORECASE)


def _plain(text: str) -> str:
    """Lower case, punctuation dropped, whitespace runs made one space."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return " ".join(text.split())


def mc_choice(completion: str, choices: list[str]) -> int | None:
    """The index of the choice a completion picks (module docstring), or None."""
    for pattern in (_LETTER_AT_START, _ANSWER_IS):
        found = pattern.search(completion)
        if found and LETTERS.index(found.group(1).upper()) < len(choices):
            return LETTERS.index(found.group(1).upper())
    said = _plain(completion)
    hits = [(len(_plain(c)), i) for i, c in enumerate(choices)
            if _plain(c) and (said == _plain(c) or said.startswith(_plain(c) + " "))]
    return max(hits)[1] if hits else None


def mc_score(row: dict, completion: str) -> float:
    _, choices, gold = _mc_fields(row, "problem")
    return float(mc_choice(completion, choices) == gold)


def _import_function(spec: str) -> Callable:
    module_name, _, fn_name = spec.rpartition(":")
    if not module_name or not fn_name:
        raise DataError(f"--verifier {spec!r}: give one of {list(BUILT_IN)} or module:function")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise DataError(f"--verifier {spec}: {path}: no such file")
            loader = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001 - any failure to import the user's module is their input's fault
        raise DataError(f"--verifier {spec}: cannot import {module_name}: {type(err).__name__}: {err}") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise DataError(f"--verifier {spec}: {module_name} has no function {fn_name!r}")
    return fn


class Verifier:
    """`verifier(problem, completion) -> score` (a float); `correct(score)` is score >= threshold."""

    def __init__(self, spec: str, threshold: float = 1.0):
        self.spec, self.threshold = spec, float(threshold)
        built_in = {"gsm8k": gsm8k_score, "gsm8k_strict": gsm8k_strict_score, "mc": mc_score}
        self.kind = spec if spec in built_in else "user"
        self.fn = built_in.get(spec) or _import_function(spec)

    def __call__(self, problem: Problem, completion: str) -> float:
        try:
            score: Any = self.fn(problem.row, completion)
        except Exception as err:  # noqa: BLE001 - the user's function failed on this problem: name it
            raise DataError(f"{problem.where}: verifier {self.spec} raised {type(err).__name__}: {err} "
                            f"(completion {completion[:80]!r})") from None
        if isinstance(score, bool):
            return float(score)
        if not isinstance(score, numbers.Real) or math.isnan(float(score)):
            raise DataError(f"{problem.where}: verifier {self.spec} returned {score!r} "
                            f"({type(score).__name__}); it must return a bool or a number (not NaN)")
        return float(score)

    def correct(self, score: float) -> bool:
        return score >= self.threshold
