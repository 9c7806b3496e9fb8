"""The pair writer: source rows -> standard-format JSONL {"prompt", "chosen", "rejected"}, written atomically.

`make_pairs` reads every input (up to `max_rows` rows in all), turns each row into its pairs (`mc` formats: one per
wrong choice; `math` formats: one, with one computed result corrupted), optionally puts a k-shot prefix before
each prompt, and writes OUT, or with `split_eval=N` N source rows' pairs (drawn by the seed; all pairs of a
question stay on one side) to OUT's sibling `NAME.eval.jsonl` and the rest to OUT. Each file is written to a
temporary path beside it and renamed into place, so a failed run never leaves a half-written OUT.

Every row draws from its own generator, `random.Random(f"{seed}/{n}")` (n: the row's number over all inputs), so
the same seed gives the same bytes, and `max_rows` keeps the first rows' pairs as they were.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from jsmaug.data.files import DataError
from jsmaug.pairs import math as math_lib, mc
from jsmaug.pairs.read import BadRow, Skips, iter_rows
from jsmaug.pairs.shots import ShotPool

FORMATS = mc.FORMATS + math_lib.FORMATS


@dataclass
class Summary:
    rows_read: int = 0
    pairs: int = 0
    eval_pairs: int = 0
    skipped: Skips = field(default_factory=Skips)
    out: str = ""
    eval_out: str = ""

    def line(self) -> str:
        where = f"{self.pairs} pairs written ({self.pairs - self.eval_pairs} to {self.out}"
        where += f", {self.eval_pairs} to {self.eval_out})" if self.eval_out else ")"
        return f"{self.rows_read} rows read, {where}; rows skipped: {self.skipped.line()}"

    def as_dict(self) -> dict:
        return {"rows_read": self.rows_read, "pairs_written": self.pairs, "eval_pairs": self.eval_pairs,
                "rows_skipped": dict(self.skipped), "out": self.out, "eval_out": self.eval_out}


def eval_path(out: str | os.PathLike) -> Path:
    """OUT's eval sibling: runs/arc.jsonl -> runs/arc.eval.jsonl."""
    out = Path(out)
    return out.with_name(out.name[:-len(".jsonl")] + ".eval.jsonl")


def _parse(fmt: str, row: dict, where: str):
    return mc.question(fmt, row, where) if fmt in mc.FORMATS else math_lib.problem(fmt, row, where)


def _rows(fmt: str, paths: Sequence[str], on_bad_row: str, skips: Skips, max_rows: int | None = None):
    """(n, parsed item) over all inputs; bad rows raise or are counted (they count towards max_rows)."""
    n = 0
    for path in paths:
        for where, row in iter_rows(path, on_bad_row, skips):
            if max_rows is not None and n >= max_rows:
                return
            n += 1
            try:
                yield n - 1, _parse(fmt, row, where)
            except BadRow:
                if on_bad_row == "error":
                    raise
                skips["bad row"] += 1
        if max_rows is not None and n >= max_rows:
            return


def shot_pool(fmt: str, paths: Sequence[str], on_bad_row: str = "error") -> ShotPool:
    items = [item for _, item in _rows(fmt, paths, on_bad_row, Skips())]
    if not items:
        raise DataError(f"--shots_from {' '.join(map(str, paths))}: no usable rows")
    return ShotPool([i.prompt for i in items], [i.solved() for i in items], "--shots_from " + " ".join(map(str, paths)))


def row_pairs(fmt: str, item, rng: random.Random, max_wrong: int | None = None) -> list[dict] | str:
    """The pairs of one parsed row (prompts without shots), or the reason it is skipped."""
    if fmt in mc.FORMATS:
        wrong = mc.wrong_choices(item, rng, max_wrong)
        if not wrong:
            return "no wrong choice"
        return [{"prompt": item.prompt, "chosen": item.target(item.gold), "rejected": item.target(j)} for j in wrong]
    got = math_lib.corrupt(fmt, item, rng)
    if isinstance(got, str):
        return got
    return [{"prompt": item.prompt, "chosen": " " + item.solution, "rejected": " " + got[0]}]


def _write_tmp(path: Path, pairs: Iterable[dict]) -> Path:
    """The pairs as JSONL in a temporary file beside `path` (renamed into place by the caller)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        for p in pairs:
            fh.write(json.dumps(p, ensure_ascii=False) + "\n")
    return tmp


def write_atomic(files: dict[Path, list[dict]]) -> None:
    """Every file written to its temporary path first, then all renamed; on an error none is left behind."""
    tmps: dict[Path, Path] = {}
    try:
        for path, pairs in files.items():
            tmps[path] = _write_tmp(path, pairs)
        for path, tmp in tmps.items():
            os.replace(tmp, path)
    finally:
        for tmp in tmps.values():
            if tmp.exists():
                tmp.unlink()


def make_pairs(fmt: str, inputs: Sequence[str], out: str | os.PathLike, *, seed: int = 0, shots: int = 0,
               shots_from: Sequence[str] = (), max_rows: int | None = None, split_eval: int = 0,
               on_bad_row: str = "error", max_wrong: int | None = None) -> Summary:
    """Write the pairs of `inputs` to `out` (and its eval sibling under split_eval); see the module docstring."""
    if fmt not in FORMATS:
        raise DataError(f"--format must be one of {list(FORMATS)}, got {fmt!r}")
    out = Path(out)
    if out.suffix != ".jsonl":
        raise DataError(f"{out}: the output must be a .jsonl file")
    if shots and not shots_from:
        raise DataError("--shots needs --shots_from FILE (solved examples from another split)")
    if not out.parent.is_dir():
        raise DataError(f"{out}: folder {out.parent} does not exist")
    pool = shot_pool(fmt, shots_from, on_bad_row) if shots else None
    summary = Summary(out=str(out))
    groups: list[list[dict]] = []
    for n, item in _rows(fmt, inputs, on_bad_row, summary.skipped, max_rows):
        pairs = row_pairs(fmt, item, random.Random(f"{seed}/{n}"), max_wrong)
        if isinstance(pairs, str):
            summary.skipped[pairs] += 1
            continue
        if pool is not None:
            prompt = pool.prefix(item.prompt, shots, random.Random(f"{seed}/shots/{n}"), item.where)
            pairs = [dict(p, prompt=prompt) for p in pairs]
        groups.append(pairs)
    summary.rows_read = sum(summary.skipped.values()) + len(groups)
    if not groups:
        raise DataError(f"{' '.join(map(str, inputs))}: no pairs made ({summary.line()})")
    eval_rows: set[int] = set()
    files: dict[Path, list[dict]] = {}
    if split_eval:
        if not 0 < split_eval < len(groups):
            raise DataError(f"--split_eval {split_eval}: needs fewer than the {len(groups)} rows that gave pairs")
        eval_rows = set(random.Random(f"{seed}/split").sample(range(len(groups)), split_eval))
        summary.eval_out = str(eval_path(out))
        files[eval_path(out)] = [p for i, g in enumerate(groups) if i in eval_rows for p in g]
        summary.eval_pairs = len(files[eval_path(out)])
    files[out] = [p for i, g in enumerate(groups) if i not in eval_rows for p in g]
    write_atomic(files)
    summary.pairs = sum(len(g) for g in groups)
    return summary
