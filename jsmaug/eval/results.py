"""Reporting: lm-evaluation-harness's standard error of a mean, a plain-text table, atomic JSON."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

from jsmaug.paths import atomic_write


def mean_stderr(values: Sequence[float]) -> float | None:
    """lm-eval 0.4.13's `mean_stderr`: the sample standard deviation (n - 1) over sqrt(n). None for fewer than
    two values (lm-eval writes "N/A" there)."""
    n = len(values)
    if n < 2:
        return None
    mu = sum(values) / n
    return math.sqrt(sum((x - mu) ** 2 for x in values) / (n - 1)) / math.sqrt(n)


def summary_table(results: dict[str, dict[str, Any]]) -> str:
    """A plain-text table of every scalar metric of every evaluated file."""
    lines = []
    for name, res in results.items():
        lines.append(name)
        for k, v in res.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            lines.append(f"  {k:<36} {v:>12.4f}" if isinstance(v, float) else f"  {k:<36} {v:>12d}")
    return "\n".join(lines)


def write_json(path: str | Path, obj: Any) -> None:
    """Writes JSON atomically (temp file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(obj, indent=2))
