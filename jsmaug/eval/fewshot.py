"""Few-shot contexts as lm-evaluation-harness 0.4.13 builds them (`ConfigurableTask.fewshot_context`).

Which examples: lm-eval's default `ContextSampler` is one `random.Random(seed)` per task, seeded with
`--fewshot_random_seed` (default 1234) and drawn from once per evaluated row, in the file's order:
`rnd.sample(fewshot_docs, k)`. `Random.sample` depends only on the pool's length, so drawing indices gives the
same examples. A task whose few-shot split is a different split from its test split (the task YAML that
`tools/compare_lm_eval.py` writes: `fewshot_split: train` on `--fewshot_file`) never removes the evaluated row
from the pool, and neither does this module.

How they are joined (`build_qa_turn`): every example is a user turn `text + target_delimiter` (" ") and an
assistant turn `answer + fewshot_delimiter` ("\\n\\n"); the evaluated row is a user turn with no delimiter. As
plain text the turns are concatenated. Under a chat template (`--apply_chat_template`) they are either kept
as turns (`--fewshot_as_multiturn`, the default with a template in lm-eval's CLI) or collapsed into one user
message holding the plain text; the template is rendered with `add_generation_prompt=True`.
"""

from __future__ import annotations

import random
from typing import Sequence

from jsmaug.errors import DataError

LM_EVAL_FEWSHOT_SEED = 1234
TARGET_DELIMITER = " "
FEWSHOT_DELIMITER = "\n\n"


def sample_fewshot(pool_size: int, k: int, n_rows: int, *, seed: int = LM_EVAL_FEWSHOT_SEED,
                   source: str = "the few-shot file") -> list[list[int]]:
    """For each of `n_rows` evaluated rows (in order), the indices into the pool of its k examples, in the
    order lm-eval's default sampler returns them."""
    if k < 0:
        raise ValueError(f"num_fewshot must be >= 0, got {k}")
    if k == 0:
        return [[] for _ in range(n_rows)]  # lm-eval returns [] without drawing
    if k > pool_size:
        raise DataError(f"{source}: num_fewshot={k} needs at least {k} rows, it has {pool_size}")
    rnd = random.Random(seed)
    pool = list(range(pool_size))
    return [rnd.sample(pool, k) for _ in range(n_rows)]


def pick_examples(n_rows: int, num_fewshot: int, fewshot_rows: Sequence[dict] | None, *,
                  seed: int = LM_EVAL_FEWSHOT_SEED) -> tuple[list[dict], list[list[int]]]:
    """(the pool of few-shot rows, each evaluated row's indices into it): `sample_fewshot` over `fewshot_rows`,
    whose errors name the few-shot file (the rows' `where`); k examples with no pool is an error."""
    if num_fewshot and not fewshot_rows:
        raise DataError(f"num_fewshot={num_fewshot} needs few-shot rows (--fewshot_file)")
    pool = list(fewshot_rows or [])
    source = pool[0]["where"].rsplit(":", 1)[0] if pool and "where" in pool[0] else "the few-shot file"
    return pool, sample_fewshot(len(pool), num_fewshot, n_rows, seed=seed, source=source)


def turns(shots: Sequence[tuple[str, str]], text: str) -> list[tuple[str, str, str]]:
    """(role, content, plain-text delimiter) of every turn: the examples' (text, answer) pairs, then `text`."""
    out = []
    for q, a in shots:
        out += [("user", q, TARGET_DELIMITER), ("assistant", a, FEWSHOT_DELIMITER)]
    return out + [("user", text, "")]


def render(messages: list[tuple[str, str, str]], chat_template=None, multiturn: bool = True) -> str:
    """The context string: plain text, or the chat template's rendering (module docstring)."""
    plain = "".join(content + delim for _, content, delim in messages)
    if chat_template is None:
        return plain
    if multiturn:
        chat = [{"role": role, "content": content} for role, content, _ in messages]
    else:
        chat = [{"role": "user", "content": plain}]
    return chat_template.render(chat, add_generation_prompt=True)
