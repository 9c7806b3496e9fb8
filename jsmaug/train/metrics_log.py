"""The run's metrics on disk: `workdir/metrics.jsonl` (one JSON object per logged step), TensorBoard events and
`metrics.png`, and the progress lines. Reading tolerates a last line torn by a kill mid-write (it is dropped; its
step is logged again). Paths are `etils.epath` paths: the workdir may be a bucket, where a file cannot be
appended to, so there metrics.jsonl is rewritten whole (through a temporary name) at each logged step."""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
from etils import epath

from jsmaug.errors import DataError
from jsmaug.paths import atomic_write, is_remote

_SPEAK = [True]


def speak(on: bool) -> None:
    """Whether `log` prints: only process 0 of a multi-process run does (see `run_outputs`)."""
    _SPEAK[0] = on


def log(msg: str) -> None:
    if _SPEAK[0]:
        print(msg, flush=True)



def read_metrics(path, drop_torn_last: bool = False) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl, in order. A last line cut short by a kill mid-write is dropped with
    `drop_torn_last` (its step is logged again on resume); any other bad line is an error naming it."""
    lines = [ln for ln in epath.Path(path).read_text().splitlines() if ln.strip()]
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


def expert_load_summary(load) -> dict[str, float]:
    """The share of routed tokens per expert (128 numbers with Qwen3-MoE) as four: the smallest and largest share
    over the mean share (1.0 each when balanced), the routing entropy over its maximum log(E) (1.0 = uniform), and
    the number of experts that got no token."""
    load = np.asarray(load, np.float64)
    if load.size == 0 or not load.any():  # no experts, or none routed: a dense model's load is one zero
        return {}
    mean = 1.0 / load.size
    nz = load[load > 0]
    entropy = float(-(nz * np.log(nz)).sum() / np.log(load.size)) if load.size > 1 else 1.0
    return {"moe/expert_load_min": float(load.min() / mean), "moe/expert_load_max": float(load.max() / mean),
            "moe/expert_load_entropy": entropy, "moe/experts_idle": int((load == 0).sum())}


class MetricsWriter:
    """metrics.jsonl (one object per logged step) and TensorBoard event files."""

    def __init__(self, workdir, resume_step: int, tensorboard: bool):
        self.path = epath.Path(workdir) / "metrics.jsonl"
        # After a resume, drop lines logged past the restored checkpoint (they will be logged again).
        self.lines, self.keys = [], {}
        if self.path.exists():
            for r in read_metrics(self.path, drop_torn_last=True):
                if r["step"] <= resume_step:
                    self.lines.append(json.dumps(r) + "\n")
                    self.keys.setdefault(r["step"], set()).update(r)
            self._rewrite()
        self.fh = None if is_remote(self.path) else self.path.open("a")
        self.tb = None
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter

                self.tb = SummaryWriter(str(epath.Path(workdir) / "tensorboard"))
            except ImportError:  # pragma: no cover - tensorboardX is a core dependency
                log("note: tensorboardX not installed; no TensorBoard events")

    def _rewrite(self) -> None:
        atomic_write(self.path, "".join(self.lines))

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        """One JSON line (vectors such as `moe/expert_load` as their summary, `expert_load_summary`) and the
        same values in TensorBoard, where the vectors go whole (one scalar per entry)."""
        rec, vectors = {"step": step}, {}
        for k, v in metrics.items():
            v = np.asarray(v)
            if v.ndim:
                vectors[k] = v.tolist()
                rec.update(expert_load_summary(v) if k == "moe/expert_load" else {k: v.tolist()})
            else:
                rec[k] = int(v) if v.dtype.kind in "iu" else float(v)
        line = json.dumps(rec) + "\n"
        self.keys.setdefault(step, set()).update(rec)
        if self.fh is not None:
            self.fh.write(line)
            self.fh.flush()
        else:
            self.lines.append(line)
            self._rewrite()
        if self.tb is not None:
            for k, v in rec.items():
                if k != "step" and not isinstance(v, list):
                    self.tb.add_scalar(k, v, step)
            for k, v in vectors.items():
                for i, x in enumerate(v):
                    self.tb.add_scalar(f"{k}/{i}", x, step)
            self.tb.flush()

    def logged(self, step: int, key: str) -> bool:
        """Whether a record of `step` with `key` is in the file already."""
        return key in self.keys.get(step, ())

    def close(self):
        if self.fh is not None:
            self.fh.close()
        if self.tb is not None:
            self.tb.close()


def plot_metrics(metrics_path, out_png) -> None:
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
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    atomic_write(out_png, buf.getvalue())
