"""Paths that may be local or in a bucket (`gs://bucket/run`): `etils.epath`, as Orbax uses, and one rule for
writing a file so that a reader never sees half of it.

Locally a file is written under a temporary name in its folder and renamed (a rename is atomic on a POSIX
file system). In a bucket an object appears only once its upload is complete, so a file is written in place:
a rename there is a copy and a delete, slower and no safer.
"""

from __future__ import annotations

import json
import os
from typing import Any

from etils import epath


def is_remote(path) -> bool:
    return "://" in str(path)


def absolute(path) -> epath.Path:
    """An absolute epath (Orbax wants absolute paths); a bucket path as it is."""
    return epath.Path(path) if is_remote(path) else epath.Path(os.path.abspath(path))


def atomic_write(path, data: bytes | str) -> None:
    """Writes `path` whole or not at all (see the module docstring)."""
    path = epath.Path(path)
    target = path if is_remote(path) else path.parent / f".{path.name}.tmp-{os.getpid()}"
    if isinstance(data, str):
        target.write_text(data)
    else:
        target.write_bytes(data)
    if target != path:
        target.replace(path)


def read_json_object(path: epath.Path, error: type[Exception]) -> dict[str, Any]:
    """The JSON object in `path`, or `error` naming the file (the tokenizer's files raise a DataError, a
    checkpoint's config.json a CheckpointError)."""
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise error(f"{path}: not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise error(f"{path}: must hold a JSON object, got {type(value).__name__}")
    return value
