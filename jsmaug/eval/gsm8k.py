"""GSM8K scored by generation, as lm-evaluation-harness 0.4.13's `gsm8k` task scores it.

The task's strings (lm_eval/tasks/gsm8k/gsm8k.yaml; a test reads the installed file and compares):
  - prompt `Question: {question}\\nAnswer:`, few-shot examples `Question: ...\\nAnswer: {answer}` joined by
    "\\n\\n" (`jsmaug.eval.fewshot`), from `--fewshot_file`;
  - greedy decoding until "Question:", "</s>", "<|im_end|>" or the tokenizer's EOS (`jsmaug.eval.generation`);
  - `strict-match`: the first `#### (\\-?[0-9\\.\\,]+)` in the completion; `flexible-extract`: the last match of
    `(-?[$0-9.,]{2,})|(-?[0-9]+)`; "[invalid]" when nothing matches;
  - `exact_match` of the extracted answer against the whole reference answer, both with the regexes
    `,`, `\\$`, `(?s).*#### `, `\\.$` removed (in that order) and lower-cased;
  - the figure is the mean over rows, its standard error lm-eval's `mean_stderr`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Sequence

from jsmaug.data import files as files_lib
from jsmaug.data.tokenizer import Tokenizer
from jsmaug.errors import DataError
from jsmaug.eval import fewshot as fewshot_lib, generation
from jsmaug.eval.results import mean_stderr
from jsmaug.models.config import ModelConfig

DOC_TO_TEXT = "Question: {question}\nAnswer:"
UNTIL = ("Question:", "</s>", "<|im_end|>")
STRICT_PATTERN = r"#### (\-?[0-9\.\,]+)"
FLEXIBLE_PATTERN = r"(-?[$0-9.,]{2,})|(-?[0-9]+)"
REGEXES_TO_IGNORE = (",", "\\$", "(?s).*#### ", "\\.$")
IGNORE_CASE = True
FALLBACK = "[invalid]"
STRICT, FLEXIBLE = "exact_match,strict-match", "exact_match,flexible-extract"


def read_gsm8k(path: str | Path) -> list[dict[str, Any]]:
    """JSONL/Parquet rows {"question": str, "answer": str with '#### N'} (GSM8K's layout). Errors name the file
    and line."""
    out = []
    for where, row in files_lib.read_rows(path):
        if isinstance(row, Exception):
            raise row
        if not isinstance(row, dict):
            raise DataError(f"{where}: a row must be an object with 'question' and 'answer'")
        for key in ("question", "answer"):
            if not isinstance(row.get(key), str):
                raise DataError(f"{where}: needs a string field {key!r} (GSM8K's layout)")
        if "#### " not in row["answer"]:
            raise DataError(f"{where}: 'answer' has no '#### N' final answer (GSM8K's layout ends the answer "
                            f"with '#### ' and the number)")
        out.append({"where": where, "question": row["question"], "answer": row["answer"]})
    if not out:
        raise DataError(f"{path}: no rows")
    return out


def doc_to_text(row: dict) -> str:
    return DOC_TO_TEXT.format(question=row["question"])


def build_prompts(rows: Sequence[dict], *, num_fewshot: int = 0, fewshot_rows: Sequence[dict] | None = None,
                  chat_template=None, fewshot_as_multiturn: bool = True,
                  seed: int = fewshot_lib.LM_EVAL_FEWSHOT_SEED) -> list[str]:
    """Every row's context string, character for character lm-eval's (module docstring)."""
    pool, picks = fewshot_lib.pick_examples(len(rows), num_fewshot, fewshot_rows, seed=seed)
    prompts = []
    for row, pick in zip(rows, picks):
        shots = [(doc_to_text(pool[i]), pool[i]["answer"]) for i in pick]
        prompts.append(fewshot_lib.render(fewshot_lib.turns(shots, doc_to_text(row)), chat_template,
                                          fewshot_as_multiturn))
    return prompts


def extract_strict(completion: str) -> str:
    """lm-eval's `strict-match` filter: regex, first match, stripped; FALLBACK when none."""
    found = re.findall(STRICT_PATTERN, completion)
    return found[0].strip() if found else FALLBACK


def extract_flexible(completion: str) -> str:
    """lm-eval's `flexible-extract` filter: the last match, its first non-empty group, stripped."""
    found = re.findall(FLEXIBLE_PATTERN, completion)
    if not found:
        return FALLBACK
    groups = [g for g in found[-1] if g]
    return groups[0].strip() if groups else FALLBACK


def normalise(text: str) -> str:
    """exact_match's normalisation: the task's regexes removed in order, then lower-cased."""
    for pattern in REGEXES_TO_IGNORE:
        text = re.sub(pattern, "", text)
    return text.lower() if IGNORE_CASE else text


def exact_match(prediction: str, reference: str) -> int:
    return int(normalise(prediction) == normalise(reference))


def score_completions(rows: Sequence[dict], prompts: Sequence[str], completions: Sequence[str],
                      num_fewshot: int) -> dict[str, Any]:
    """The result dict of `gsm8k_eval` from given completions."""
    per_row = []
    for row, prompt, completion in zip(rows, prompts, completions, strict=True):
        strict, flexible = extract_strict(completion), extract_flexible(completion)
        per_row.append({"prompt": prompt, "completion": completion, "strict": strict, "flexible": flexible,
                        "target": normalise(row["answer"]), STRICT: exact_match(strict, row["answer"]),
                        FLEXIBLE: exact_match(flexible, row["answer"])})
    out: dict[str, Any] = {"task": "gsm8k", "num_fewshot": num_fewshot, "n": len(per_row)}
    for key in (STRICT, FLEXIBLE):
        scores = [float(r[key]) for r in per_row]
        out[key] = sum(scores) / len(scores) if scores else float("nan")
        out[key.replace(",", "_stderr,")] = mean_stderr(scores)
    out["rows"] = per_row
    return out


def gsm8k_eval(config: ModelConfig, params, tok: Tokenizer, rows: Sequence[dict], *, num_fewshot: int = 0,
               fewshot_rows: Sequence[dict] | None = None, chat_template=None, fewshot_as_multiturn: bool = True,
               max_new_tokens: int = generation.LM_EVAL_MAX_GEN_TOKS, batch_size: int = 8,
               progress: bool = True) -> dict[str, Any]:
    """Exact match by generation over `read_gsm8k` rows (module docstring). `chat_template`: None, a
    `jsmaug.data.formats.ChatTemplate`, or a spec for `formats.load_chat_template` ('tokenizer' or a file)."""
    if isinstance(chat_template, str):
        from jsmaug.data import formats

        chat_template = formats.load_chat_template(chat_template, tok)
    prompts = build_prompts(rows, num_fewshot=num_fewshot, fewshot_rows=fewshot_rows, chat_template=chat_template,
                            fewshot_as_multiturn=fewshot_as_multiturn)
    bar = generation.Progress(len(rows), "gsm8k", enabled=progress)
    hits = {STRICT: 0, FLEXIBLE: 0}

    def on_batch(idx: list[int], texts: list[str]) -> None:
        for i, text in zip(idx, texts):
            hits[STRICT] += exact_match(extract_strict(text), rows[i]["answer"])
            hits[FLEXIBLE] += exact_match(extract_flexible(text), rows[i]["answer"])
        done = bar.done + len(idx)
        bar.update(len(idx), f"exact match strict {hits[STRICT] / done:.3f}, flexible {hits[FLEXIBLE] / done:.3f}")

    completions = generation.generate_until(config, params, tok, prompts, generation.stop_sequences(tok, UNTIL),
                                            max_new_tokens=max_new_tokens, batch_size=batch_size, on_batch=on_batch)
    return score_completions(rows, prompts, completions, num_fewshot)
