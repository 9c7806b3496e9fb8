"""Steps of near-equal tokens (`data.balanced_steps`): the order in which a run takes its pairs, chosen so that
every step (and every packed group of a step) holds about the same number of tokens.

Why: a packed step's shape is set by its fullest group, and every new shape is a compile of the whole step. With
a plain shuffle the steps' token counts spread widely (issue 44's mild pairs, 8 a step: 1,451 to 2,567 tokens),
so a run either pads every step to the fullest one (one shape, 24% of the slots empty) or compiles a shape per
row count (10% empty, three more compiles). Balanced steps on the same pairs hold 1,891 to 2,084 tokens, and one
shape leaves 7.6% empty (tests/test_balanced.py; the run's figures in docs/performance.md).

How: each epoch (a seeded permutation of the pairs, so every epoch differs), the epoch's pairs are sorted by tokens
(prompt twice, chosen, rejected; the prompt once with shared prompts; ties in the permutation's order) and cut into
`batch_size / groups` strata of equal size, longest first. Group-batch k of the epoch takes one pair from each
stratum, drawn by a seeded permutation of each stratum; step i is group-batches i*groups .. i*groups + groups - 1,
one per packed group (micro-batch x data shard), so each group gets one pair of every length class. Each pair is
used once an epoch; the `n mod batch_size` pairs left over by the permutation sit that epoch out (others the next).
Like `batches`, step i is a pure function of (pairs, seed, i): a resumed run gets the same steps, and every process
makes the same ones.

This changes which pairs share a step (not which pairs a run sees, nor how often), so a balanced run's losses
differ step by step from a shuffled one's. The default (`balanced_steps: null`) balances packed runs only: a
padded step pays for its longest row whatever the others hold.
"""

from __future__ import annotations

import sys
from typing import Sequence

import numpy as np

from jsmaug.data.batches import batches
from jsmaug.data.files import DataError
from jsmaug.data.packing import item_lengths


class BalancedBatches:
    """Global batches of `batch_size` pairs, each epoch's steps of near-equal tokens (the module's docstring).
    `ds[i]` is step i's list of pairs, for any i >= 0 (epochs repeat without end)."""

    def __init__(self, examples: Sequence[dict], batch_size: int, *, seed: int, groups: int = 1,
                 shared: bool = False):
        if not examples:
            raise DataError("no examples to batch (every pair was dropped, or the files are empty)")
        if len(examples) < batch_size:
            raise DataError(f"{len(examples)} pairs, fewer than one step's {batch_size}")
        self.examples = list(examples)
        self.batch_size, self.seed = batch_size, seed
        self.groups = groups if groups > 0 and batch_size % groups == 0 else 1
        self.steps_per_epoch = len(self.examples) // batch_size
        # the tokens a pair puts into a packed step: its two sequences, or with shared prompts its unit
        self.tokens = np.array([sum(item_lengths(p, shared)) for p in self.examples])
        self._cached: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return sys.maxsize

    def epoch(self, e: int) -> np.ndarray:
        """(steps_per_epoch, batch_size) pair indices of epoch `e`'s steps."""
        if self._cached is not None and self._cached[0] == e:
            return self._cached[1]
        rng = np.random.default_rng([self.seed, e])
        m, per_group = self.steps_per_epoch, self.batch_size // self.groups
        used = rng.permutation(len(self.examples))[:m * self.batch_size]
        order = used[np.argsort(-self.tokens[used], kind="stable")]
        strata = order.reshape(per_group, m * self.groups)  # stratum s: the s-th longest share of the pairs
        picks = np.stack([rng.permutation(s) for s in strata], axis=1)  # (group-batches, per_group)
        steps = picks.reshape(m, self.batch_size)
        self._cached = (e, steps)
        return steps

    def __getitem__(self, i: int) -> list[dict]:
        if not isinstance(i, (int, np.integer)) or i < 0:
            raise IndexError(f"step index {i!r}: a step number >= 0")
        e, k = divmod(int(i), self.steps_per_epoch)
        return [self.examples[j] for j in self.epoch(e)[k]]


def is_balanced(data_cfg) -> bool:
    """`data.balanced_steps`, with null meaning: balanced when packing."""
    b = data_cfg.balanced_steps
    return bool(data_cfg.packing) if b is None else bool(b)


def train_batches(examples: Sequence[dict], data_cfg, batch_size: int, *, seed: int, groups: int = 1):
    """A run's steps of pairs (`ds[i]`: step i's list): balanced (`BalancedBatches`) or shuffled
    (`batches.batches`), as `data.balanced_steps` says. `groups`: the packed groups of a step (micro-batches x
    data shards), each balanced on its own."""
    if is_balanced(data_cfg):
        return BalancedBatches(examples, batch_size, seed=seed, groups=groups,
                               shared=data_cfg.share_prompt)
    return batches(examples, batch_size, seed=seed)
