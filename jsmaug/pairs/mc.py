"""Multiple-choice rows -> prompt and choices as lm-evaluation-harness formats them, and one pair per wrong choice.

Formats (the columns as the hub ships them; a dotted name is a nested struct, e.g. Parquet's `choices`):

    arc        question, choices.text, choices.label, answerKey              (allenai/ai2_arc)
    hellaswag  activity_label, ctx_a, ctx_b (or ctx), endings, label        (Rowan/hellaswag)
    mc         query|question|context|prompt, choices, gold|label|answer    (tools/evaluate.py --mc's rows)

The text is the harness's (`lm_eval/tasks/arc`, `lm_eval/tasks/hellaswag`), so pairs train on what the harness scores:

    arc        prompt "Question: {question}\\nAnswer:", choice i " {choices.text[i]}",
               gold = choices.label.index(answerKey)
    hellaswag  prompt preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize()),
               choice i " " + preprocess(endings[i]), gold = int(label), where preprocess strips, turns
               " [title]" into ". ", removes [bracketed] text and replaces double spaces by one
    mc         prompt = the row's text as it is, choice i " {choices[i]}"

(" " is the harness's target delimiter; Python's `str.capitalize` lowercases the rest of ctx_b, as the harness's
does.) Each question gives one pair per wrong choice (or `max_wrong` of them, drawn by the row's generator):
prompt, chosen = the gold choice, rejected = that wrong choice.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from jsmaug.pairs.read import BadRow, column, text_field

FORMATS = ("arc", "hellaswag", "mc")
DELIMITER = " "
MC_CONTEXT_KEYS = ("query", "question", "context", "prompt")
MC_GOLD_KEYS = ("gold", "label", "answer")


@dataclass(frozen=True)
class Question:
    """One multiple-choice question, formatted: `prompt` + DELIMITER + choices[i] is choice i's full text."""

    where: str
    prompt: str
    choices: tuple[str, ...]
    gold: int

    def target(self, i: int) -> str:
        return DELIMITER + self.choices[i]

    def solved(self) -> str:
        """The question with its answer: a few-shot example."""
        return self.prompt + self.target(self.gold)


def preprocess(text: str) -> str:
    """HellaSwag's clean-up in lm-evaluation-harness (`tasks/hellaswag/utils.py`)."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _choice_list(value, name: str, where: str) -> list[str]:
    if not isinstance(value, (list, tuple)) or len(value) < 2:
        raise BadRow(where, f"{name!r} must be a list of at least 2 strings")
    for i, c in enumerate(value):
        if not isinstance(c, str) or not c.strip():
            raise BadRow(where, f"{name}[{i}] must be a non-empty string, got {c!r}")
    return list(value)


def arc_question(row: dict, where: str) -> Question:
    question = text_field(row, "question", where)
    texts = _choice_list(column(row, "choices.text", where), "choices.text", where)
    labels = column(row, "choices.label", where)
    if not isinstance(labels, (list, tuple)) or len(labels) != len(texts):
        raise BadRow(where, f"'choices.label' must be a list as long as 'choices.text' ({len(texts)})")
    key = column(row, "answerKey", where)
    if key not in labels:
        raise BadRow(where, f"answerKey {key!r} is not one of the labels {list(labels)}")
    return Question(where, f"Question: {question}\nAnswer:", tuple(texts), list(labels).index(key))


def hellaswag_question(row: dict, where: str) -> Question:
    label = text_field(row, "activity_label", where, allow_empty=True)
    if "ctx_a" in row or "ctx_b" in row:
        ctx = text_field(row, "ctx_a", where, allow_empty=True) + " " + \
            text_field(row, "ctx_b", where, allow_empty=True).capitalize()
    else:
        ctx = text_field(row, "ctx", where)
    endings = _choice_list(column(row, "endings", where), "endings", where)
    gold = column(row, "label", where)
    if isinstance(gold, str) and gold.strip().lstrip("-").isdigit():
        gold = int(gold)
    if gold == "" or gold is None:
        raise BadRow(where, "'label' is empty (HellaSwag's test split has no labels; use train or validation)")
    if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(endings):
        raise BadRow(where, f"'label' must be an index into the {len(endings)} endings, got {gold!r}")
    choices = tuple(preprocess(e) for e in endings)
    for i, c in enumerate(choices):
        if not c:
            raise BadRow(where, f"endings[{i}] is empty after the harness's clean-up")
    return Question(where, preprocess(label + ": " + ctx), choices, gold)


def mc_question(row: dict, where: str) -> Question:
    ctx_key = next((k for k in MC_CONTEXT_KEYS if k in row), None)
    if ctx_key is None:
        raise BadRow(where, f"needs a string column, one of {list(MC_CONTEXT_KEYS)} (columns: {sorted(row)})")
    prompt = text_field(row, ctx_key, where)
    choices = _choice_list(column(row, "choices", where), "choices", where)
    gold_key = next((k for k in MC_GOLD_KEYS if k in row), None)
    gold = row.get(gold_key) if gold_key else None
    if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(choices):
        raise BadRow(where, f"needs an integer {'/'.join(MC_GOLD_KEYS)} in [0, {len(choices)}), got {gold!r}")
    return Question(where, prompt, tuple(choices), gold)


READERS = {"arc": arc_question, "hellaswag": hellaswag_question, "mc": mc_question}


def question(fmt: str, row: dict, where: str) -> Question:
    return READERS[fmt](row, where)


def wrong_choices(q: Question, rng: random.Random, max_wrong: int | None = None) -> list[int]:
    """Indices of the wrong choices whose text differs from the gold's, in order; at most `max_wrong`, drawn."""
    wrong = [i for i, c in enumerate(q.choices) if i != q.gold and c != q.choices[q.gold]]
    if max_wrong is not None and len(wrong) > max_wrong:
        wrong = sorted(rng.sample(wrong, max_wrong))
    return wrong
