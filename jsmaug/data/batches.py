"""Preference data: files -> validated rows -> tokenised pairs -> padded [chosen; rejected] batches.

The data never knows about the mesh or the loss. Reading files is `data_files`, the row formats (standard,
implicit prompt, conversational) and chat templates are `pair_formats`, and how a pair becomes ids (the joined
text, split where the prompt ends) is `tokenizer`. A batch of `batch_size` pairs is a dict of numpy arrays with
2 * batch_size rows, the chosen rows first, then the rejected rows in the same order:

    input_ids   (2B, L) int32   <s> prompt completion </s>, then padding (id 0)
    segment_ids (2B, L) int32   1 on tokens, 0 on padding (the model's attention mask / packing ids)
    positions   (2B, L) int32   0..n-1 on tokens
    labels      (2B, L) int32   labels[t] = input_ids[t + 1] (the shift is made here, explicitly); 0 at the end
    loss_mask   (2B, L) int32   1 where labels[t] is a COMPLETION token (prompt and padding excluded)

L is the smallest of a few fixed lengths (`bucket_lengths`) that holds the batch, so a run compiles a handful of
step functions at most.
"""

from __future__ import annotations

import dataclasses
import os
from collections import Counter
from typing import Any, Iterable, Sequence

import grain
import numpy as np

from jsmaug.data import formats as pair_formats
from jsmaug.data.files import DataError, read_rows
from jsmaug.data.tokenizer import Tokenizer, default_tokenizer_path, tokenize_pair, truncate

__all__ = ["DataConfig", "DataError", "Tokenizer", "default_tokenizer_path", "prepare", "read_rows",
           "tokenize_pair", "batches", "batch_length", "collate", "completion_row", "stack_rows", "bucket_lengths",
           "power_of_two_buckets"]


@dataclasses.dataclass(frozen=True)
class DataConfig:
    train_path: str | None = None
    eval_path: str | None = None
    # A folder (tokenizer.json or tokenizer.model) or file; None = init_from's own tokenizer, else Mixtral's
    # (mistral-common's tokenizer.model.v1).
    tokenizer_path: str | None = None
    prompt_key: str = "prompt"
    chosen_key: str = "chosen"
    rejected_key: str = "rejected"
    max_length: int = 256
    max_prompt_length: int = 128
    on_bad_row: str = "error"  # "error" | "skip"
    chat_template: str | None = None  # conversational rows: a Jinja file, or "tokenizer" (the tokenizer folder's)
    bucket_lengths: tuple[int, ...] = ()  # () = powers of two from 32 up to max_length, and max_length
    packing: bool = False  # pack each step's sequences into rows (jsmaug.data.packing): no compute on padding
    packing_length: int | None = None  # packed row length; None = the run's own (packing.run_layout)
    # A compile of the step counted as the token slots of this many steps' real tokens: a packed run takes another
    # row count only where it saves more (packing.run_layout; 35: the tiny config's step on the 2-core CPU, 22 s of
    # CPU per compile against 0.29 ms per slot, docs/performance.md; at 6-8 s a compile since 2026-12-07, the fewest
    # slots' layout still lost over a 40-step run); 0 = the fewest slots, however many compiles
    packing_compile_steps: float = 35.0
    # Steps of near-equal tokens (jsmaug.data.balanced): true | false | null = true when packing (a packed step's
    # shape is set by its fullest group; issue 44's mild pairs: one shape at 7.6% padding against 24%)
    balanced_steps: bool | None = None
    # Packed rows hold each pair once: its prompt, then both completions, each seeing the prompt (jsmaug.data.packing,
    # jsmaug.segments): the prompt's layers run once a pair, not twice. Needs packing; not with the splash kernel
    share_prompt: bool = False
    # TFDS instead of files: with tfds_config set, train_path / eval_path name splits ("train", "test").
    tfds_config: str | None = None  # generic | metamath | arc | hellaswag
    tfds_manual_dir: str | None = None  # where the raw files lie
    tfds_data_dir: str | None = None  # where the prepared array_record files go (default ~/tensorflow_datasets)


# ------------------------------------------------------------------------------------------------ TFDS splits

def tfds_source(cfg: DataConfig, split: str):
    """The TFDS builder's random-access data source for a split (built once from manual_dir if needed)."""
    import tensorflow_datasets as tfds

    from jsmaug.data.datasets.preference_pairs import PreferencePairs

    if cfg.tfds_manual_dir is None:
        raise DataError("data.tfds_manual_dir: required with data.tfds_config (the folder holding the files)")
    builder = PreferencePairs(config=cfg.tfds_config, data_dir=cfg.tfds_data_dir, file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=cfg.tfds_manual_dir))
    if split not in builder.info.splits:
        raise DataError(f"tfds {cfg.tfds_config}: no split {split!r}; have {sorted(builder.info.splits)}")
    return builder.as_data_source(split=split)


def read_tfds_rows(cfg: DataConfig, split: str) -> list[tuple[str, dict]]:
    src = tfds_source(cfg, split)
    keys = {"prompt": cfg.prompt_key, "chosen": cfg.chosen_key, "rejected": cfg.rejected_key}
    rows = []
    for i in range(len(src)):
        ex = src[i]
        rows.append((f"tfds {cfg.tfds_config}/{split}:row {i}",
                     {keys[k]: (v.decode("utf-8") if isinstance(v, bytes) else v) for k, v in ex.items()}))
    return rows


@dataclasses.dataclass
class PrepareReport:
    read: int = 0
    kept: int = 0
    dropped: Counter = dataclasses.field(default_factory=Counter)
    skipped_rows: list[str] = dataclasses.field(default_factory=list)
    lengths: list[int] = dataclasses.field(default_factory=list)
    formats: dict[str, str] = dataclasses.field(default_factory=dict)  # file -> its format (first row)

    def summary(self) -> dict[str, Any]:
        lens = np.asarray(self.lengths or [0])
        return {"pairs_read": self.read, "pairs_kept": self.kept, "dropped": dict(self.dropped),
                "formats": sorted(set(self.formats.values())),
                "tokens_per_row_p50_p90_p99_max": [int(np.percentile(lens, q)) for q in (50, 90, 99, 100)]}

    def __str__(self) -> str:
        s = self.summary()
        dropped = ", ".join(f"{k}={v}" for k, v in sorted(s["dropped"].items())) or "none"
        p = s["tokens_per_row_p50_p90_p99_max"]
        fmt = f" ({', '.join(s['formats'])} format)" if s["formats"] else ""
        return (f"pairs read {s['pairs_read']}{fmt}, kept {s['pairs_kept']}, dropped: {dropped}; "
                f"tokens per row p50 {p[0]} p90 {p[1]} p99 {p[2]} max {p[3]}")


def prepare(paths: str | Iterable[str], cfg: DataConfig, tok: Tokenizer | None = None
            ) -> tuple[list[dict[str, np.ndarray]], PrepareReport]:
    """Reads, validates and tokenises every pair of the given files (any of `pair_formats`' formats)."""
    tok = tok or Tokenizer(cfg.tokenizer_path)
    if cfg.on_bad_row not in ("error", "skip"):
        raise DataError(f"data.on_bad_row must be 'error' or 'skip', got {cfg.on_bad_row!r}")
    template = pair_formats.load_chat_template(cfg.chat_template, tok)
    keys = (cfg.prompt_key, cfg.chosen_key, cfg.rejected_key)
    report = PrepareReport()
    examples = []
    for path in ([paths] if isinstance(paths, (str, os.PathLike)) else paths):
        rows = read_tfds_rows(cfg, str(path)) if cfg.tfds_config else read_rows(path)
        fmt = next((f for f in (pair_formats.detect_format(r, keys) for _, r in rows) if f), None)
        if fmt in (pair_formats.CONVERSATIONAL, pair_formats.CONVERSATIONAL_IMPLICIT) and template is None:
            raise DataError(f"{path}: the rows are conversations (lists of messages), which need a chat template: "
                            "set data.chat_template to a Jinja file (configs/chat_templates/mixtral_instruct.jinja "
                            "is Mixtral-Instruct's) or to 'tokenizer' (the tokenizer folder's own)")
        if fmt is not None:
            report.formats[str(path)] = fmt
        for where, row in rows:
            report.read += 1
            try:
                ids = pair_formats.row_ids(where, row, fmt, keys, tok, template)
            except DataError as err:
                if cfg.on_bad_row == "error":
                    raise
                reason = str(err).split(": ", 1)[1]
                report.dropped["bad_row: " + reason.split(" (")[0]] += 1
                report.skipped_rows.append(str(err))
                continue
            ex = truncate(*ids, cfg.max_length, cfg.max_prompt_length, tok.bos_id)
            if isinstance(ex, str):
                report.dropped[ex] += 1
                continue
            report.kept += 1
            n = len(ex["prompt"])
            report.lengths += [n + len(ex["chosen"]), n + len(ex["rejected"])]
            examples.append(ex)
    return examples, report


# ------------------------------------------------------------------------------------------------ batching

def power_of_two_buckets(max_length: int) -> tuple[int, ...]:
    """Powers of two from 32 below `max_length`, then `max_length` itself."""
    out, n = [], 32
    while n < max_length:
        out.append(n)
        n *= 2
    return tuple(out) + (max_length,)


def bucket_lengths(cfg: DataConfig) -> tuple[int, ...]:
    if cfg.bucket_lengths:
        return tuple(sorted(cfg.bucket_lengths))
    return power_of_two_buckets(cfg.max_length)


def completion_row(prompt: np.ndarray, completion: np.ndarray, length: int) -> dict[str, np.ndarray]:
    """One model row: prompt + completion padded to `length`, loss_mask on the completion's labels."""
    seq = np.concatenate([prompt, completion])
    n = len(seq)
    row = {k: np.zeros(length, np.int32) for k in ("input_ids", "segment_ids", "positions", "labels", "loss_mask")}
    row["input_ids"][:n] = seq
    row["segment_ids"][:n] = 1
    row["positions"][:n] = np.arange(n)
    row["labels"][:n - 1] = seq[1:]
    # labels[t] = seq[t+1] is a completion token for t+1 >= len(prompt), i.e. t >= len(prompt) - 1.
    row["loss_mask"][len(prompt) - 1:n - 1] = 1
    return row


def batch_length(pairs: Sequence[dict[str, np.ndarray]], buckets: Sequence[int]) -> int:
    """The smallest bucket length that holds every pair's longer row."""
    longest = max(len(p["prompt"]) + max(len(p["chosen"]), len(p["rejected"])) for p in pairs)
    length = next((b for b in buckets if b >= longest), None)
    if length is None:
        raise DataError(f"a pair of {longest} tokens exceeds the largest bucket length {buckets[-1]}")
    return length


def collate(pairs: Sequence[dict[str, np.ndarray]], buckets: Sequence[int], length: int | None = None
            ) -> dict[str, np.ndarray]:
    """[chosen rows; rejected rows], padded to `length` (default: the smallest bucket that fits)."""
    length = batch_length(pairs, buckets) if length is None else length
    return stack_rows([completion_row(p["prompt"], p["chosen"], length) for p in pairs] +
                      [completion_row(p["prompt"], p["rejected"], length) for p in pairs])


def stack_rows(rows: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """`completion_row` dicts -> one batch dict of (rows, L) arrays."""
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def batches(examples: Sequence[dict], batch_size: int, *, seed: int, shuffle: bool = True,
            repeat: bool = True) -> grain.MapDataset:
    """A Grain MapDataset of global batches, each a list of `batch_size` pairs: a seeded shuffle, a new order
    each epoch. Which rows of a batch a process collates is the mesh's business (`sharding.put_pairs`).

    Random access: batch i of the dataset is a pure function of (examples, seed, i), so a resumed run that
    asks for batch `step` gets exactly what an uninterrupted run got. The dataset's state IS the step.
    """
    if not examples:
        raise DataError("no examples to batch (every pair was dropped, or the files are empty)")
    ds = grain.MapDataset.source(list(examples))
    if shuffle:
        ds = ds.shuffle(seed=seed)
    if repeat:
        ds = ds.repeat(None)
    return ds.batch(batch_size, drop_remainder=repeat, batch_fn=list)
