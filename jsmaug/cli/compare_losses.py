"""The Smaug paper's experiment: DPO vs DPOP (and any other loss) from one start, on identical batches.

    jsmaug compare-losses [--config configs/tiny_dpop.yaml] [--losses dpo dpop ...] \
        [--init_from CKPT | --sft_steps 150] [--steps 120] [--out runs/compare] [key=value ...]

A loss is a name of `jsmaug.losses` (TRL's, `dpo`, `dpop`, `simpo`, `cpo`, `orpo`), optionally with its own
hyper-parameters after `@`: `simpo@beta=2.0@simpo_gamma=0.5`, `exo_pair@label_smoothing=0.01` (each becomes a
`loss.key=value` override of that run only; the run's folder and label are the whole string).

1. The start: --init_from (a converter checkpoint or a training workdir), or an SFT warm-up of --sft_steps steps
   in OUT/start_sft (loss.type=sft on the chosen completions of the config's training data) from the config's
   model, so the start already gives the chosen answers a reasonable likelihood, as the paper's models did.
2. One training run per loss from that start, with the same seed, so step i sees the same batch in every run
   (a batch is a pure function of data, seed and step). Everything else comes from --config and the overrides.
3. The start and every final policy are scored on the eval split (`jsmaug.train.eval.preference_eval`, the start as
   the reference).

Writes OUT/compare_losses.png (train logps of chosen and rejected completions and preference accuracy over
steps, eval points as markers) and OUT/summary.json (per loss: start and end chosen / rejected logps on the
eval split, eval reward accuracy, the fraction of eval pairs whose chosen logp fell). Runs live in OUT/<loss>;
rerunning with the same OUT resumes or reuses finished runs.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from jsmaug import losses  # noqa: E402
from jsmaug.data import batches as data_lib, tokenizer_folder
from jsmaug.models.config import ConfigError  # noqa: E402
from jsmaug.train import checkpoint, eval as eval_lib, metrics_log, run as train
from jsmaug.train.config import load_run_config  # noqa: E402

# The SFT warm-up's folder: not a loss name, so `--losses sft` (the `sft` loss) gets its own run.
START = "start_sft"
COLORS = {"dpo": "tab:red", "dpop": "tab:blue", "ipo": "tab:green", "hinge": "tab:purple", "sft": "tab:gray"}


def _color(name: str, i: int):
    import matplotlib

    return COLORS.get(name) or matplotlib.colormaps["tab20"](i % 20)


def parse_loss(spec: str) -> tuple[str, list[str]]:
    """'simpo@beta=2.0@simpo_gamma=0.5' -> ('simpo', ['loss.beta=2.0', 'loss.simpo_gamma=0.5'])."""
    name, *params = spec.split("@")
    for p in params:
        if "=" not in p:
            raise ConfigError(f"--losses {spec}: after '@' give key=value, got {p!r}")
    losses.lookup(name)
    return name, [f"loss.{p}" for p in params]


def split_overrides(loss_args: list[str], overrides: list[str]) -> tuple[list[str], list[str]]:
    """`--losses dpo simpo@beta=2.0 key=value`: argparse hands the overrides to --losses; move them back (an
    override has its `=` before any `@`; a loss spec has its `@` first)."""
    is_override = [("=" in x and "@" not in x.split("=")[0]) for x in loss_args]
    return ([x for x, o in zip(loss_args, is_override) if not o],
            [x for x, o in zip(loss_args, is_override) if o] + list(overrides))


def _run(config: str, overrides: list[str], extra: list[str]) -> None:
    cfg, raw = load_run_config(config, overrides + extra)
    train.run(cfg, raw)


def plot(runs: dict[str, Path], out_png: Path, title: str, start_eval: dict[str, float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("logps/chosen", "log p(chosen)"), ("logps/rejected", "log p(rejected)"),
              ("rewards/accuracies", "preference accuracy")]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for i, (name, workdir) in enumerate(runs.items()):
        recs = metrics_log.read_metrics(workdir / "metrics.jsonl")
        tr = [r for r in recs if "loss" in r]
        ev = [r for r in recs if "eval/loss" in r]
        color = _color(name, i)
        for ax, (key, label) in zip(axes, panels):
            ax.plot([r["step"] for r in tr], [r[key] for r in tr], color=color, label=f"{name} (train)")
            if ev:
                ax.plot([r["step"] for r in ev], [r["eval/" + key] for r in ev], "o--", color=color, alpha=0.7,
                        label=f"{name} (eval)")
            ax.set_title(label)
            ax.set_xlabel("step")
    for ax, (key, _) in zip(axes, panels):
        if key in start_eval:
            ax.axhline(start_eval[key], color="black", linestyle=":", linewidth=1, label="start (eval)")
    axes[0].legend(fontsize=7, ncol=2 if len(runs) > 6 else 1)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    tmp = out_png.with_name(f".{out_png.stem}.tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, out_png)


def train_runs(args, specs: dict, out: Path) -> tuple[str, dict[str, Path]]:
    """The SFT warm-up (unless --init_from), then one run per loss from that start. Returns (start, runs)."""
    common = ["export_hf=false", f"checkpoint.every={max(args.steps, args.sft_steps)}", "checkpoint.keep=1"]
    start = args.init_from
    if start is None:
        if args.sft_steps < 1:
            raise ConfigError("give --init_from or --sft_steps > 0")
        sft = ["loss.type=sft", f"train.steps={args.sft_steps}", f"workdir={out / START}", "init_from=null",
               "log.eval_every=0"]
        if args.sft_learning_rate is not None:
            sft.append(f"train.learning_rate={args.sft_learning_rate}")
        print(f"== SFT warm-up: {args.sft_steps} steps -> {out / START}", flush=True)
        _run(args.config, args.overrides, common + sft)
        start = str(out / START)
    runs = {}
    for spec, (name, extra) in specs.items():
        print(f"== {spec}: {args.steps} steps from {start} -> {out / spec}", flush=True)
        _run(args.config, args.overrides,
             common + [f"loss.type={name}", f"train.steps={args.steps}", f"workdir={out / spec}",
                       f"init_from={start}", *extra])
        runs[spec] = out / spec
    return start, runs


def score(base, start: str, runs: dict[str, Path]) -> dict[str, dict]:
    """The start and every final policy on the eval split, the start as the reference."""
    tok = data_lib.Tokenizer(tokenizer_folder.run_tokenizer_path(base.data.tokenizer_path, str(start)))
    examples, _ = data_lib.prepare(base.data.eval_path, base.data, tok)
    mconf, start_params = checkpoint.load_params(start)
    scored = {"start": eval_lib.preference_eval(mconf, start_params, examples, start_params, beta=base.loss.beta)}
    for name, workdir in runs.items():
        _, params = checkpoint.load_params(workdir)
        scored[name] = eval_lib.preference_eval(mconf, params, examples, start_params, beta=base.loss.beta)
    return scored


def summarize(args, base, start: str, runs: dict[str, Path], scored: dict[str, dict]) -> dict:
    s0 = scored["start"]
    summary = {"config": args.config, "overrides": args.overrides, "start": start, "steps": args.steps,
               "eval_path": base.data.eval_path, "eval_pairs": s0["pairs"],
               "start_eval": {"logps/chosen": s0["logps/chosen"], "logps/rejected": s0["logps/rejected"],
                              "logps/accuracy": s0["logps/accuracy"]},
               "losses": {}, "seconds": None}
    for name, workdir in runs.items():
        s = scored[name]
        train_recs = [r for r in metrics_log.read_metrics(workdir / "metrics.jsonl") if "loss" in r]
        summary["losses"][name] = {
            "start_chosen_logps": s0["logps/chosen"], "end_chosen_logps": s["logps/chosen"],
            "start_rejected_logps": s0["logps/rejected"], "end_rejected_logps": s["logps/rejected"],
            "chosen_logps_change": s["logps/chosen"] - s0["logps/chosen"],
            "rejected_logps_change": s["logps/rejected"] - s0["logps/rejected"],
            "eval_reward_accuracy": s["rewards/accuracies"], "eval_logps_accuracy": s["logps/accuracy"],
            "eval_fraction_chosen_decreased": s["chosen_logps_decreased"],
            "train_first": {k: train_recs[0][k] for k in ("step", "logps/chosen", "logps/rejected")},
            "train_last": {k: train_recs[-1][k] for k in ("step", "logps/chosen", "logps/rejected",
                                                          "rewards/accuracies")},
        }
    return summary


def print_table(summary: dict) -> None:
    start = summary["start_eval"]
    print(f"\neval split {summary['eval_path']} ({summary['eval_pairs']} pairs); start: logp(chosen) "
          f"{start['logps/chosen']:.2f}, logp(rejected) {start['logps/rejected']:.2f}")
    w = max(8, *(len(n) + 2 for n in summary["losses"]))
    print(f"{'loss':<{w}}{'chosen start':>14}{'chosen end':>12}{'rejected end':>14}{'reward acc':>12}"
          f"{'chosen fell':>13}")
    for name, s in summary["losses"].items():
        print(f"{name:<{w}}{s['start_chosen_logps']:>14.2f}{s['end_chosen_logps']:>12.2f}"
              f"{s['end_rejected_logps']:>14.2f}{s['eval_reward_accuracy']:>12.2f}"
              f"{s['eval_fraction_chosen_decreased']:>13.2f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/tiny_dpop.yaml")
    ap.add_argument("--losses", nargs="+", default=["dpo", "dpop"])
    ap.add_argument("--init_from", default=None, help="the start (skips the SFT warm-up)")
    ap.add_argument("--sft_steps", type=int, default=150)
    ap.add_argument("--sft_learning_rate", type=float, default=None, help="default: the config's")
    ap.add_argument("--steps", type=int, default=120, help="steps of every preference run")
    ap.add_argument("--out", default="runs/compare")
    ap.add_argument("overrides", nargs="*", help="key=value overrides of the config, for every run")
    args = ap.parse_args(argv)
    args.losses, args.overrides = split_overrides(args.losses, args.overrides)
    out = Path(args.out)
    t_all = time.time()
    try:
        try:
            specs = {spec: parse_loss(spec) for spec in args.losses}
        except ValueError as err:
            raise ConfigError(f"--losses: {err}") from None
        base, _ = load_run_config(args.config, args.overrides)
        if not base.data.eval_path:
            raise ConfigError("data.eval_path: the comparison scores every run on the eval split; set one")
        start, runs = train_runs(args, specs, out)
        scored = score(base, start, runs)
    except (ConfigError, data_lib.DataError, checkpoint.CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    summary = summarize(args, base, start, runs, scored)
    summary["seconds"] = round(time.time() - t_all, 1)
    plot(runs, out / "compare_losses.png",
         f"{args.config}: {', '.join(args.losses)} from {start}, {args.steps} steps, identical batches",
         summary["start_eval"])
    eval_lib.write_json(out / "summary.json", summary)
    print_table(summary)
    print(f"wrote {out / 'compare_losses.png'} and {out / 'summary.json'} ({summary['seconds']}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
