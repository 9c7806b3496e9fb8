"""k-shot prefixes: solved examples from another file, never the row itself.

As lm-evaluation-harness builds a few-shot context: the examples' "prompt + target" texts joined by the few-shot
delimiter "\\n\\n", then the delimiter, then the row's prompt. An example is left out of a row's prefix when its
prompt equals the row's (the same question, e.g. when --shots_from is the file being made into pairs), so no
prefix ever holds the answer it is asking for.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

from jsmaug.data.files import DataError

FEWSHOT_DELIMITER = "\n\n"


@dataclass
class ShotPool:
    """Solved examples: `keys[i]` the prompt of example i (what a row must not equal), `texts[i]` its solved text."""

    keys: list[str]
    texts: list[str]
    source: str = "--shots_from"

    def __post_init__(self):
        self._count = Counter(self.keys)

    def prefix(self, prompt: str, k: int, rng: random.Random, where: str = "") -> str:
        """`prompt` with k examples before it, drawn with `rng` from those whose prompt is not `prompt`."""
        if k <= 0:
            return prompt
        own = self._count.get(prompt, 0)
        if len(self.keys) - own < k:
            raise DataError(f"{where + ': ' if where else ''}--shots {k}: {self.source} has only "
                            f"{len(self.keys) - own} examples other than this row")
        picked = [i for i in rng.sample(range(len(self.keys)), k + own) if self.keys[i] != prompt][:k]
        return FEWSHOT_DELIMITER.join(self.texts[i] for i in picked) + FEWSHOT_DELIMITER + prompt
