"""Who writes what: every file of a training run, and the one process that writes it.

    what                             written by                                   when
    workdir/config.json              process 0                                    once the run is known to go ahead
    workdir/metrics.jsonl            process 0                                    every log.every steps, each eval
    workdir/tensorboard/             process 0                                    with metrics.jsonl
    progress lines (stdout)          process 0 (each process prints its errors)
    workdir/metrics.png              process 0                                    at the end
    workdir/ref_cache/*.npy          process 0, once every process has computed   before the first step
                                     its rows and the table is gathered
    workdir/hf/                      process 0; every process takes part in       at the end
                                     gathering each tensor to it
    workdir/checkpoints/<step>/      every process its own shards; Orbax commits  checkpoint.every, the end,
                                     the step when all have written               preemption
    workdir/damaged_checkpoints/     process 0 (`checkpoint.Manager`)             on resume

A training feature that writes a file adds it here, and the one-writer rule comes with it. Whatever process 0
writes is written whole or not at all (`paths.atomic_write`), so a kill never leaves half a file. The workdir
may be a bucket (`gs://bucket/run`): every path is an `etils.epath.Path`, as in Orbax.
"""

from __future__ import annotations

import io
import json
import os
from typing import Any

import numpy as np
from etils import epath

from jsmaug.parallel import distributed
from jsmaug.models.config import ConfigError
from jsmaug.train.metrics_log import MetricsWriter, plot_metrics
from jsmaug.paths import atomic_write


class _NoMetrics:
    """What the processes other than 0 hold in place of the metrics writer."""

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        pass

    def logged(self, step: int, key: str) -> bool:
        return False

    def close(self) -> None:
        pass


class RunOutputs:
    """The run's files (the table above). `writer` is True on process 0 only."""

    def __init__(self, workdir: str | os.PathLike, writer: bool):
        self.workdir = epath.Path(workdir)
        self.writer = writer

    def check_writable(self) -> None:
        """Creates the workdir, or stops with a clear error. Every process checks: each writes checkpoint shards."""
        probe = self.workdir / f".write_probe-{os.getpid()}"
        try:
            self.workdir.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as err:
            raise ConfigError(f"workdir: cannot write {self.workdir}: {err.strerror or err}") from err

    @property
    def checkpoints(self) -> epath.Path:
        return self.workdir / "checkpoints"

    def write_config(self, raw_config: dict | None) -> None:
        if self.writer:
            atomic_write(self.workdir / "config.json", json.dumps(raw_config or {}, indent=2, default=str))

    def metrics(self, resume_step: int, tensorboard: bool):
        return MetricsWriter(self.workdir, resume_step, tensorboard) if self.writer else _NoMetrics()

    def plot(self) -> None:
        if self.writer:
            plot_metrics(self.workdir / "metrics.jsonl", self.workdir / "metrics.png")

    def ref_cache_path(self, fingerprint: str) -> epath.Path:
        return self.workdir / "ref_cache" / f"ref_logps-{fingerprint}.npy"

    def save_ref_cache(self, path: epath.Path, table: np.ndarray) -> None:
        if self.writer:
            path.parent.mkdir(parents=True, exist_ok=True)
            buf = io.BytesIO()
            np.save(buf, table)
            atomic_write(path, buf.getvalue())

    def export_hf(self, config, params, tokenizer_path: str, chat_template: str | None) -> dict[str, Any]:
        """The final policy in the hub layout in workdir/hf: every process gathers, process 0 writes."""
        from jsmaug import hf

        summary = hf.save(self.workdir / "hf", config, params, tokenizer_path=tokenizer_path, overwrite=True,
                          chat_template=chat_template, write=self.writer)
        distributed.sync("jsmaug_export_hf")
        return summary
