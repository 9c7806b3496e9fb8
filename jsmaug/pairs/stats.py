"""Are these pairs in the regime where DPOP matters? Token edit distance between chosen and rejected.

For each pair: the Levenshtein distance between the token ids of chosen and of rejected (each completion encoded
on its own, without BOS; `--words` splits on whitespace instead), the length of their shared prefix, and its
share of the chosen tokens. The distances come from `edit_distances`: the common prefix and suffix are cut first
(that leaves the distance unchanged and leaves a few tokens for near-identical pairs), then the classic dynamic
programme runs over many pairs at once in NumPy, one row of the table per step for a whole batch of pairs of
similar length (the insertion term of a row is a running minimum: D[i, j] = j + min_{k<=j} (T[k] - k)).

The reading: when at least half the pairs are under 5 tokens apart, "low edit distance" (the paper's case).
"""

from __future__ import annotations

import random
from typing import Sequence

import numpy as np

from jsmaug.data.files import DataError
from jsmaug.pairs.read import iter_rows

LOW = 5  # tokens: "under 5 tokens apart"
LOW_READING = "low edit distance: DPO is likely to lower chosen log-probs here; DPOP keeps them"
HIGH_READING = ("high edit distance: DPO is less likely to lower chosen log-probs here; DPOP and DPO should "
                "behave alike")


# ------------------------------------------------------------------------------------------------ edit distance

def _trim(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, int, int]:
    """(a, b) without their common prefix and suffix, and the lengths of that prefix and suffix."""
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    p = int(diff[0]) if len(diff) else n
    a, b = a[p:], b[p:]
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[len(a) - n:][::-1] != b[len(b) - n:][::-1])
    s = int(diff[0]) if len(diff) else n
    return a[:len(a) - s], b[:len(b) - s], p, s


def _batch_levenshtein(a: list[np.ndarray], b: list[np.ndarray]) -> np.ndarray:
    """Distances of the pairs (a[k], b[k]), one DP row per step over the whole batch (len(a[k]) <= len(b[k]))."""
    na = np.array([len(x) for x in a])
    nb = np.array([len(x) for x in b])
    rows, cols = int(na.max()), int(nb.max())
    out = nb.copy()  # a[k] empty: the distance is len(b[k])
    if rows == 0:
        return out
    dtype = np.int16 if cols < 30000 else np.int32
    A = np.full((len(a), rows), -1, np.int64)
    B = np.full((len(b), cols), -2, np.int64)
    for k, (x, y) in enumerate(zip(a, b)):
        A[k, :len(x)], B[k, :len(y)] = x, y
    ar = np.arange(cols + 1, dtype=dtype)
    D = np.broadcast_to(ar, (len(a), cols + 1)).copy()
    T = np.empty_like(D)
    pick = np.arange(len(a))
    for i in range(1, rows + 1):
        T[:, 0] = i
        np.minimum(D[:, 1:] + 1, D[:, :-1] + (A[:, i - 1, None] != B), out=T[:, 1:])
        T -= ar
        np.minimum.accumulate(T, axis=1, out=D)
        D += ar
        done = na == i
        if done.any():
            out[done] = D[pick[done], nb[done]]
    return out


def edit_distances(a: Sequence[Sequence[int]], b: Sequence[Sequence[int]], batch: int = 1024
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(Levenshtein distances, common prefix lengths, common suffix lengths after the prefix) of the pairs
    (a[k], b[k]) of id sequences."""
    if len(a) != len(b):
        raise ValueError(f"{len(a)} sequences against {len(b)}")
    dist = np.zeros(len(a), np.int64)
    prefix = np.zeros(len(a), np.int64)
    suffix = np.zeros(len(a), np.int64)
    mids: list[tuple[np.ndarray, np.ndarray]] = []
    for k, (x, y) in enumerate(zip(a, b)):
        x, y, prefix[k], suffix[k] = _trim(np.asarray(x, np.int64), np.asarray(y, np.int64))
        mids.append((x, y) if len(x) <= len(y) else (y, x))
    # Pairs of similar size share a batch, so little of the table is padding.
    order = sorted(range(len(mids)), key=lambda k: (len(mids[k][1]), len(mids[k][0])))
    todo = [k for k in order if len(mids[k][0])]
    for k in order:
        if not len(mids[k][0]):
            dist[k] = len(mids[k][1])
    for s in range(0, len(todo), batch):
        ks = todo[s:s + batch]
        dist[ks] = _batch_levenshtein([mids[k][0] for k in ks], [mids[k][1] for k in ks])
    return dist, prefix, suffix


def levenshtein_reference(a: Sequence, b: Sequence) -> int:
    """The plain O(len(a) * len(b)) dynamic programme (for tests)."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


# ------------------------------------------------------------------------------------------------ tokens, pairs

def load_tokenizer(path: str | None = None):
    from jsmaug.data.tokenizer import Tokenizer

    return Tokenizer(path)


def encode_all(tokenizer, texts: Sequence[str], vocab: dict[str, int] | None = None) -> list[list[int]]:
    """Token ids of each text without special tokens added (`Tokenizer.encode`), or with tokenizer=None ids of
    whitespace-split words in `vocab` (grown as new words come; pass the same dict for chosen and rejected)."""
    if tokenizer is None:
        vocab = {} if vocab is None else vocab
        return [[vocab.setdefault(w, len(vocab)) for w in t.split()] for t in texts]
    return [tokenizer.encode(t) for t in texts]


def _completion(value, name: str, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in value):
        return "\n".join(m["content"] for m in value)  # conversational: the messages' text
    raise DataError(f"{where}: {name!r} must be a string or a list of messages, got {type(value).__name__}")


def read_pairs(path: str, on_bad_row: str = "error", sample: int | None = None, seed: int = 0
               ) -> tuple[list[str], list[str]]:
    chosen, rejected = [], []
    for where, row in iter_rows(path, on_bad_row):
        try:
            if "chosen" not in row or "rejected" not in row:
                raise DataError(f"{where}: needs 'chosen' and 'rejected' (columns: {sorted(row)})")
            c, r = _completion(row["chosen"], "chosen", where), _completion(row["rejected"], "rejected", where)
        except DataError:
            if on_bad_row == "error":
                raise
            continue
        chosen.append(c)
        rejected.append(r)
    if not chosen:
        raise DataError(f"{path}: no pairs")
    if sample is not None and sample < len(chosen):
        keep = sorted(random.Random(seed).sample(range(len(chosen)), sample))
        chosen, rejected = [chosen[k] for k in keep], [rejected[k] for k in keep]
    return chosen, rejected


def pair_stats(chosen: Sequence[str], rejected: Sequence[str], tokenizer=None, chunk: int = 20000) -> dict:
    """The figures `report` prints (tokenizer None: whitespace words)."""
    vocab: dict[str, int] = {}
    parts = []
    for s in range(0, len(chosen), chunk):  # a chunk's ids at a time: memory stays that of the texts
        c_ids = encode_all(tokenizer, chosen[s:s + chunk], vocab)
        r_ids = encode_all(tokenizer, rejected[s:s + chunk], vocab)
        parts.append((*edit_distances(c_ids, r_ids), [len(x) for x in c_ids], [len(x) for x in r_ids]))
    dist, prefix, suffix, c_len, r_len = (np.concatenate([p[i] for p in parts]).astype(np.float64 if i > 2 else
                                                                                      np.int64) for i in range(5))
    share = np.where(c_len > 0, prefix / np.maximum(c_len, 1), 0.0)
    shared = np.where(c_len > 0, (prefix + suffix) / np.maximum(c_len, 1), 0.0)
    identical = int(np.sum(dist == 0))
    out = {
        "pairs": len(dist), "unit": "words" if tokenizer is None else f"tokens ({tokenizer.path})",
        "edit_distance": {"median": float(np.median(dist)), "p10": float(np.percentile(dist, 10)),
                          "p90": float(np.percentile(dist, 90)), "mean": float(dist.mean()),
                          f"share_under_{LOW}": float(np.mean(dist < LOW))},
        "shared_prefix_share": {"mean": float(share.mean()), "median": float(np.median(share))},
        "shared_prefix_suffix_share": {"mean": float(shared.mean()), "median": float(np.median(shared))},
        "chosen_length_median": float(np.median(c_len)), "rejected_length_median": float(np.median(r_len)),
        "identical_pairs": identical,
    }
    out["reading"] = LOW_READING if out["edit_distance"][f"share_under_{LOW}"] >= 0.5 else HIGH_READING
    return out


def report(s: dict) -> str:
    e, p = s["edit_distance"], s["shared_prefix_share"]
    unit = "words" if s["unit"] == "words" else "tokens"
    lines = [
        f"{s['pairs']} pairs, {s['unit']}" + (f" in {s['seconds']} s" if "seconds" in s else ""),
        f"edit distance ({unit}): median {e['median']:g}, p10 {e['p10']:g}, p90 {e['p90']:g}, "
        f"under {LOW} {unit}: {100 * e[f'share_under_{LOW}']:.1f}% of pairs",
        f"shared prefix: {100 * p['mean']:.1f}% of the chosen {unit} on average (median {100 * p['median']:.1f}%); "
        f"prefix + suffix: {100 * s['shared_prefix_suffix_share']['mean']:.1f}%",
        f"median length: chosen {s['chosen_length_median']:g} {unit}, rejected {s['rejected_length_median']:g}",
    ]
    if s["identical_pairs"]:
        lines.append(f"warning: {s['identical_pairs']} pairs have chosen == rejected ({unit})")
    lines.append(s["reading"])
    return "\n".join(lines)
