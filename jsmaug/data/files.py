"""Reading preference files: JSONL or Parquet rows, each with the place it came from ('file:line N').

The lowest layer of the data path: `data` (tokenising, batching) and the TFDS builder in `jsmaug/data/datasets` both
read files through it, and it imports neither.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from jsmaug.errors import DataError  # noqa: F401 - re-exported (data.DataError)


def read_rows(path: str | os.PathLike) -> list[tuple[str, Any]]:
    """Rows of a JSONL or Parquet file as (location, row); location is 'file:line N' or 'file:row N'.

    A JSONL line that is not valid JSON or UTF-8 comes back as a `DataError` in place of the row, so the caller
    decides (under `data.on_bad_row`) whether it stops the run or is skipped."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as err:
            raise DataError(f"{path}: cannot read Parquet ({err})") from err
        return [(f"{path}:row {i}", r) for i, r in enumerate(table.to_pylist())]
    if path.suffix not in (".jsonl", ".json"):
        raise DataError(f"{path}: unsupported file type {path.suffix!r} (use .jsonl or .parquet)")
    rows: list[tuple[str, Any]] = []
    with open(path, "rb") as fh:
        for i, raw in enumerate(fh, start=1):
            where = f"{path}:line {i}"
            if not raw.strip():
                continue
            try:
                rows.append((where, json.loads(raw.decode("utf-8"))))
            except UnicodeDecodeError as err:
                rows.append((where, DataError(f"{where}: text is not valid UTF-8 ({err})")))
            except json.JSONDecodeError as err:
                rows.append((where, DataError(f"{where}: not valid JSON ({err.msg})")))
    return rows
