"""The resume file of `jsmaug pairs sample`: OUT.partial, the settings on its first line, then one JSON record per
finished problem, appended a step at a time (whole lines, flushed to disk: a kill leaves at most a torn last line,
which the next run cuts off). A run with other settings is refused, naming the settings that differ.

With several processes only process 0 reads and writes the file; the others learn which problems are done from
it (`finished_problems`), so the file need not be on storage every host sees."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from jsmaug.errors import DataError
from jsmaug.parallel import distributed

VERSION = 3  # 2: per-row sampling keys; 3: top-p and top-k draws among lax.top_k candidates (other samples)


def partial_path(out: str | os.PathLike) -> Path:
    return Path(str(out) + ".partial")


def read_partial(path: Path, settings: dict) -> dict[int, dict]:
    """The finished problems of an earlier run with the same settings; a torn last line is cut off."""
    if not path.exists():
        return {}
    raw = path.read_bytes()
    good = raw[:raw.rfind(b"\n") + 1]  # everything up to the last complete line
    lines = good.decode("utf-8").splitlines()
    header = json.loads(lines[0]) if lines else None
    if header is not None and header.get("settings") != settings:
        before = header.get("settings") or {}
        differ = sorted(k for k in set(before) | set(settings) if before.get(k) != settings.get(k))
        raise DataError(f"{path}: a resume file written with other settings (they differ in {differ}); delete it "
                        "to start again, or run with the same settings")
    if len(good) != len(raw):
        with open(path, "r+b") as fh:
            fh.truncate(len(good))
    records = [json.loads(x) for x in lines[1:]]
    return {r["problem"]: r for r in records}


def finished_problems(path: Path, settings: dict) -> tuple[dict[int, dict], set[int]]:
    """(the records process 0 read, the finished problems' numbers on every process). Other processes get no
    records; a refused file raises on process 0 and a `DataError` pointing to it on the others."""
    state: dict = {}

    def read():
        state["done"] = read_partial(path, settings)
        return np.array([len(state["done"])], np.int64)

    where = f"{path}: process 0 could not resume from it (its error is in process 0's output)"
    count = int(distributed.from_writer(read, np.zeros(1, np.int64), where)[0])
    done = state.get("done", {})
    numbers = distributed.from_writer(lambda: np.array(sorted(done), np.int64), np.zeros(count, np.int64), where)
    return done, set(numbers.tolist())


def append_records(path: Path, settings: dict, records: Sequence[dict]) -> None:
    """One write of whole lines, flushed to disk (a kill leaves at most a torn last line)."""
    new = not path.exists() or path.stat().st_size == 0
    text = (json.dumps({"version": VERSION, "settings": settings}) + "\n") if new else ""
    text += "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def file_digest(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]
