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
    workdir/hf/README.md             process 0 (`write_run_card`)                 after workdir/hf/
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

from jsmaug.data.batches import DataConfig
from jsmaug.errors import CheckpointError, DataError
from jsmaug.parallel import distributed
from jsmaug.models.config import ConfigError
from jsmaug.train import config as run_config
from jsmaug.train.metrics_log import MetricsWriter, log, plot_metrics, read_metrics
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
        if self.writer:
            try:
                log(f"model card: {write_run_card(self.workdir, self.workdir / 'hf', config.model_type)}")
            except (ConfigError, DataError, CheckpointError, OSError) as err:  # the run is done: say so, keep it
                log(f"warning: the model card was not written ({err}); `jsmaug export --ckpt_dir "
                    f"{self.workdir}` writes one")
        distributed.sync("jsmaug_export_hf")
        return summary


# ------------------------------------------------------------------------------------------------ the model card

def _section(raw: dict, name: str, cls) -> dict[str, Any]:
    """A config.json section with the defaults filled in (config.json holds what the run was given only)."""
    return run_config.section_values(cls, raw.get(name), name)


def _loss_summary(loss: dict) -> tuple[str, str]:
    """(the loss's name for tags, 'dpop (beta=0.3, dpop_lambda=50)'): each term with the hyper-parameters it
    takes (`jsmaug.losses.config.objective`), its weight when there are several, LD-DPO and WPO."""
    from jsmaug.losses import config as loss_config

    section = run_config.LossSection(**{k: tuple(v) if isinstance(v, list) else v for k, v in loss.items()})
    try:
        obj = loss_config.objective(section)
    except ConfigError:  # a loss of the user's own that does not import here: the section as it was given
        names = [section.type] if isinstance(section.type, str) else list(section.type)
        return "+".join(names), ", ".join(names) + f" (beta={section.beta:g})"
    parts = []
    for t in obj.terms:
        hp = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in t.kwargs.items())
        weight = f"{t.weight:g} x " if len(obj.terms) > 1 else ""
        parts.append(f"{weight}{t.name}" + (f" ({hp})" if hp else ""))
    extra = ([f"LD-DPO ld_alpha={obj.ld_alpha:g}"] if obj.ld_alpha is not None else []) + \
        (["WPO pair weights"] if obj.wpo else [])
    return "+".join(t.name for t in obj.terms), " + ".join(parts) + (f"; {', '.join(extra)}" if extra else "")


def _schedule(train: dict) -> str:
    """'cosine schedule, 10 warm-up steps, to 0.1 x' (transformers' schedule names, jsmaug.train.config)."""
    warm = (f", {train['warmup_steps']} warm-up steps" if train.get("warmup_steps") else
            f", warm-up over {train['warmup_ratio']:g} of the steps" if train.get("warmup_ratio") else "")
    end = f", to {train['end_lr_fraction']:g} x" if train["schedule"] in ("cosine", "linear", "cosine_with_min_lr") \
        else ""
    return f"{train['schedule']} schedule{warm}{end}"


def run_card_inputs(workdir) -> dict[str, Any]:
    """What a run's card says, from its config.json (with the defaults it ran with) and metrics.jsonl: the
    loss, the training table, the training files, the final eval as a result, and the start (`init_from`)."""
    from jsmaug.eval import card

    workdir = epath.Path(workdir)
    raw = json.loads((workdir / "config.json").read_text()) if (workdir / "config.json").exists() else {}
    recs = read_metrics(workdir / "metrics.jsonl") if (workdir / "metrics.jsonl").exists() else []
    train = _section(raw, "train", run_config.TrainSection)
    data = _section(raw, "data", DataConfig)
    lora = _section(raw, "lora", run_config.LoraSection)
    ref = _section(raw, "reference", run_config.ReferenceSection)
    loss_name, loss_text = _loss_summary(_section(raw, "loss", run_config.LossSection))
    steps = [r for r in recs if "loss" in r]
    done = steps[-1]["step"] if steps else 0
    tokens = [r["tokens"] for r in steps if "tokens" in r]
    table = {"loss": loss_text,
             "reference": ref["mode"] + (f", TR-DPO sync every {ref['sync_every']} steps (alpha "
                                         f"{ref['mixup_alpha']:g})" if ref["sync_every"] else ""),
             "optimizer": f"AdamW (b1 {train['b1']:g}, b2 {train['b2']:g}, eps {train.get('eps', 1e-8):g}, weight "
                          f"decay {train['weight_decay']:g}), global-norm clip {train['grad_clip']:g}",
             "learning rate": f"{train['learning_rate']:g}, {_schedule(train)}",
             "steps": f"{done} of {train['steps']}",
             "batch": f"{train['batch_size']} pairs per step" +
                      (f" ({train['micro_batches']} micro-batches)" if train["micro_batches"] > 1 else ""),
             "sequence length": f"{data['max_length']} (prompt {data['max_prompt_length']})" +
                                (", packed" if data["packing"] else ""),
             "tokens seen": f"{int(sum(tokens)):,} (non-padding)" if len(tokens) == len(steps) and steps else
                            "not recorded in metrics.jsonl"}
    if lora["rank"]:
        table["LoRA"] = f"rank {lora['rank']}, alpha {lora['alpha']:g}, on {', '.join(lora['targets'])} (merged)"
    table["seed"] = raw.get("seed", 0)
    if steps:
        table["final train loss"] = f"{steps[-1]['loss']:.4f} (reward accuracy " \
                                    f"{steps[-1].get('rewards/accuracies', float('nan')):.3f})"
    evals = [r for r in recs if "eval/loss" in r and r["step"] == done]
    results = []
    if evals and data["eval_path"]:
        ev = evals[-1]
        table["final eval loss"] = f"{ev['eval/loss']:.4f}"
        out = {"results": {f"preference:{data['eval_path']}": {
            k.removeprefix("eval/"): ev[k] for k in ("eval/rewards/accuracies", "eval/logps/accuracy") if k in ev}}}
        results = card.eval_results(out, source_name="jsmaug train (final eval)")
    files = data["train_path"]
    files = [files] if isinstance(files, str) else list(files or [])
    datasets = [f"tfds:{data['tfds_config']}/{f}" if data["tfds_config"] else epath.Path(f).name for f in files]
    return {"loss": loss_name, "training": table, "datasets": datasets, "results": results,
            "tags": ["lora"] if lora["rank"] else [],
            "base": card.trace_base(raw.get("init_from")), "steps": done}


def write_run_card(workdir, out_dir, family: str, *, base_model: str | None = None, license: str | None = None,
                   datasets: list[str] | None = None, results: list | None = None):
    """out_dir/README.md for a model exported from the run in `workdir` (`jsmaug.eval.card.write_card`):
    `base_model` / `license` / `datasets` given override what the run knows (the license of the base wins
    over `license`, as the base's terms bind its fine-tunes); `results` are merged after the run's own."""
    from jsmaug.eval import card

    info = run_card_inputs(workdir)
    base = info["base"]
    lic = card.choose_license(base.license, license, log)
    bm = base_model or base.base_model
    return card.write_card(out_dir, base_model=bm, license=lic.get("license"), family=family, loss=info["loss"],
                           training=info["training"], datasets=datasets or info["datasets"],
                           results=card.merge_results(info["results"], list(results or [])),
                           base_note=None if bm else (base.chain[0] if base.chain else None), tags=info["tags"],
                           metadata={k: v for k, v in lic.items() if k != "license"})
