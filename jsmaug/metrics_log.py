"""The run's metrics on disk: `workdir/metrics.jsonl` (one JSON object per logged step), TensorBoard events and
`metrics.png`. Reading tolerates a last line torn by a kill mid-write (it is dropped; its step is logged again)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from jsmaug.data import DataError


def log(msg: str) -> None:
    print(msg, flush=True)



def read_metrics(path: Path, drop_torn_last: bool = False) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl, in order. A last line cut short by a kill mid-write is dropped with
    `drop_torn_last` (its step is logged again on resume); any other bad line is an error naming it."""
    lines = [ln for ln in Path(path).read_text().splitlines() if ln.strip()]
    out = []
    for i, ln in enumerate(lines):
        try:
            out.append(json.loads(ln))
        except json.JSONDecodeError as err:
            if drop_torn_last and i == len(lines) - 1:
                log(f"note: {path}: dropped a torn last line (a write cut short): {ln[:60]!r}")
                break
            raise DataError(f"{path}:{i + 1}: not a JSON object ({err.msg})") from err
    return out


class MetricsWriter:
    """metrics.jsonl (one object per logged step) and TensorBoard event files."""

    def __init__(self, workdir: Path, resume_step: int, tensorboard: bool):
        self.path = workdir / "metrics.jsonl"
        # After a resume, drop lines logged past the restored checkpoint (they will be logged again).
        if self.path.exists():
            keep = [r for r in read_metrics(self.path, drop_torn_last=True) if r["step"] <= resume_step]
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
            os.replace(tmp, self.path)
        self.fh = open(self.path, "a")
        self.tb = None
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter

                self.tb = SummaryWriter(str(workdir / "tensorboard"))
            except ImportError:  # pragma: no cover - tensorboardX is a core dependency
                log("note: tensorboardX not installed; no TensorBoard events")

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        rec = {"step": step}
        for k, v in metrics.items():
            v = np.asarray(v)
            rec[k] = v.tolist() if v.ndim else (int(v) if v.dtype.kind in "iu" else float(v))
        self.fh.write(json.dumps(rec) + "\n")
        self.fh.flush()
        if self.tb is not None:
            for k, v in rec.items():
                if k == "step":
                    continue
                if isinstance(v, list):
                    for i, x in enumerate(v):
                        self.tb.add_scalar(f"{k}/{i}", x, step)
                else:
                    self.tb.add_scalar(k, v, step)
            self.tb.flush()

    def close(self):
        self.fh.close()
        if self.tb is not None:
            self.tb.close()


def plot_metrics(metrics_path: Path, out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = read_metrics(metrics_path)
    train = [r for r in recs if "loss" in r]
    evals = [r for r in recs if "eval/loss" in r]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for ax, key, title in zip(axes, ["loss", "logps/chosen", "logps/rejected", "rewards/margins"],
                              ["loss", "policy logps (chosen)", "policy logps (rejected)", "reward margin"]):
        ax.plot([r["step"] for r in train], [r[key] for r in train], label="train")
        if evals:
            ax.plot([r["step"] for r in evals], [r["eval/" + key] for r in evals], "o-", label="eval")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend()
    fig.tight_layout()
    tmp = out_png.with_name(out_png.stem + ".tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, out_png)
