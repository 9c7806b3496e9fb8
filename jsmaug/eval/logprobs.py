"""`completion_logps`: the summed log-probability of a continuation given its context, the one primitive that
preference and multiple-choice scoring share.

Rows are padded to a few bucket lengths (powers of two) and the last batch is padded with copies, so a handful
of shapes compile; the jitted function is the trainer's own policy-logps function. The largest bucket is the
longest item's own length, which is right for one call over a whole set; a caller that makes many small calls
(`jsmaug pairs sample`, one per problem) passes `length_multiple` instead, so its lengths fall on a few
multiples and do not compile once per distinct length.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import numpy as np

from jsmaug.data import batches as data_lib
from jsmaug.models.config import ModelConfig
from jsmaug.parallel import sharding as shd
from jsmaug.train import step as step_lib


@functools.lru_cache(maxsize=None)
def _logps_fn(config: ModelConfig, chunk_size: int):
    def fn(params, batch):
        seq, _, _ = step_lib.policy_logps(config, params, batch, chunk_size)
        return seq.logps, seq.num_tokens
    return jax.jit(fn)


def completion_logps(config: ModelConfig, params, items: Sequence[tuple[np.ndarray, np.ndarray]],
                     batch_size: int = 16, chunk_size: int = 64, length_multiple: int = 0
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Summed log p(continuation | context) and the continuation's token count for every (context_ids,
    continuation_ids) pair, as float64 / int arrays of shape (N,). `length_multiple` > 0: each batch is padded
    to the next multiple of it (at most max_position_embeddings) instead of the power-of-two buckets."""
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
        need = max(len(c) + len(x) for c, x in chunk)
        if length_multiple > 0:
            length = min(-(-need // length_multiple) * length_multiple, config.max_position_embeddings)
        else:
            length = next(b for b in buckets if b >= need)
        rows = [data_lib.completion_row(np.asarray(c, np.int32), np.asarray(x, np.int32), length) for c, x in chunk]
        batch = data_lib.stack_rows(rows + [rows[0]] * (batch_size - len(rows)))
        lp, nt = (shd.to_host(a) for a in fn(params, batch))  # every process, where params span several
        logps[idx] = np.asarray(lp)[:len(idx)]
        ntok[idx] = np.asarray(nt)[:len(idx)]
    return logps, ntok
