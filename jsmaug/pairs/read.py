"""Source rows for pair making: JSONL, a JSON array (MetaMathQA ships one) or Parquet, each with its place.

Rows come as (where, row), `where` being 'file:line N' (JSONL, 1-based), 'file:item N' (JSON array, 0-based) or
'file:row N' (Parquet, 0-based). A row that cannot be used raises `BadRow` naming that place; under
`on_bad_row="skip"` the caller counts it instead (`Skips`).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

from jsmaug.data.files import DataError, read_rows

__all__ = ["BadRow", "DataError", "Skips", "column", "iter_rows", "text_field"]


class BadRow(DataError):
    """A row that is not in the layout its format needs; the message starts with its place."""

    def __init__(self, where: str, message: str):
        super().__init__(f"{where}: {message}")
        self.where = where


class Skips(Counter):
    """Rows skipped, by reason (insertion order kept for the summary line)."""

    def line(self) -> str:
        return ", ".join(f"{k} {v}" for k, v in self.items()) if self else "none"


def _json_array(path: Path) -> list[tuple[str, Any]] | None:
    """A `.json` file holding one JSON array (MetaMathQA-395K.json), or None when it is JSON lines."""
    with open(path, "rb") as fh:
        head = fh.read(4096).lstrip()
    if not head.startswith(b"["):
        return None
    try:
        items = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: a .json file that starts with '[' must be one JSON array ({err})") from err
    return [(f"{path}:item {i}", r) for i, r in enumerate(items)]


def iter_rows(path: str | Path, on_bad_row: str = "error", skips: Skips | None = None
              ) -> Iterator[tuple[str, dict]]:
    """(where, row) for every object row of `path`. A line that is not JSON, or a row that is not an object, raises
    `BadRow`, or under on_bad_row='skip' is counted in `skips['bad row']` and left out."""
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
    path = Path(path)
    rows = _json_array(path) if path.suffix == ".json" and path.exists() else None
    for where, row in rows if rows is not None else read_rows(path):
        if isinstance(row, Exception):
            err: DataError = row
        elif not isinstance(row, dict):
            err = BadRow(where, f"a row must be an object, got {type(row).__name__}")
        else:
            yield where, row
            continue
        if on_bad_row == "error":
            raise err
        if skips is not None:
            skips["bad row"] += 1


def column(row: dict, name: str, where: str) -> Any:
    """`row[name]`; a dotted name ('choices.text') reads a nested struct (Parquet, hub JSONL) or a flattened
    column of that name (CSV-style exports)."""
    if name in row:
        return row[name]
    head, _, rest = name.partition(".")
    if rest and isinstance(row.get(head), dict) and rest in row[head]:
        return row[head][rest]
    raise BadRow(where, f"missing column {name!r} (columns: {sorted(row)})")


def text_field(row: dict, name: str, where: str, allow_empty: bool = False) -> str:
    value = column(row, name, where)
    if not isinstance(value, str):
        raise BadRow(where, f"column {name!r} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise BadRow(where, f"column {name!r} is empty")
    return value
