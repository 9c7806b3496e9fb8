"""What `jsmaug compare-losses` shows: the figure (log-probs and preference accuracy over steps, and the
downstream bars, start against each loss's final policy) and the printed table."""

from __future__ import annotations

import os
from pathlib import Path

from jsmaug.train import metrics_log

COLORS = {"dpo": "tab:red", "dpop": "tab:blue", "ipo": "tab:green", "hinge": "tab:purple", "sft": "tab:gray"}


def _color(name: str, i: int):
    import matplotlib

    return COLORS.get(name) or matplotlib.colormaps["tab20"](i % 20)


DOWNSTREAM = [("exact_match_strict", "GSM8K EM\nstrict"), ("exact_match_flexible", "GSM8K EM\nflexible"),
              ("mc_acc", "MC acc"), ("mc_acc_norm", "MC acc_norm")]


def plot_downstream(ax, summary: dict) -> None:
    """Grouped bars: the start and every final policy on each downstream metric, with the standard error of the
    exact match as error bars."""
    keys = [(k, label) for k, label in DOWNSTREAM if k in summary["start_downstream"]]
    models = [("start", summary["start_downstream"], "black")] + [
        (name, {k[len("end_"):]: v for k, v in s.items() if k.startswith("end_")}, _color(name.split("@")[0], i))
        for i, (name, s) in enumerate(summary["losses"].items())]
    width = 0.8 / len(models)
    for j, (name, vals, color) in enumerate(models):
        xs = [i + (j - (len(models) - 1) / 2) * width for i in range(len(keys))]
        ax.bar(xs, [vals[k] for k, _ in keys], width, color=color, alpha=0.75, label=name,
               yerr=[vals.get(k + "_stderr", 0.0) for k, _ in keys], capsize=2)
    ax.set_xticks(range(len(keys)), [label for _, label in keys], fontsize=8)
    ax.set_ylim(0, 1)
    n = []
    if "generate" in summary:
        n.append(f"{summary['generate']['n']} problems")
    if "mc" in summary:
        n.append(f"{summary['mc']['n']} MC questions")
    ax.set_title(f"downstream, start vs end ({', '.join(n)})", fontsize=9)
    ax.legend(fontsize=7)


def plot(runs: dict[str, Path], out_png: Path, title: str, start_eval: dict[str, float],
         summary: dict | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("logps/chosen", "log p(chosen)"), ("logps/rejected", "log p(rejected)"),
              ("rewards/accuracies", "preference accuracy")]
    extra = summary is not None and "start_downstream" in summary
    fig, axes = plt.subplots(1, 4 if extra else 3, figsize=(20 if extra else 15, 4))
    if extra:
        plot_downstream(axes[3], summary)
        axes = axes[:3]
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
    if "start_downstream" not in summary:
        return
    keys = [k for k, _ in DOWNSTREAM if k in summary["start_downstream"]]
    what = []
    if "generate" in summary:
        g = summary["generate"]
        what.append(f"{g['path']} ({g['n']} problems, {g['num_fewshot']}-shot, chat template "
                    f"{g['chat_template']}, greedy, max_new_tokens {g['max_new_tokens']})")
    if "mc" in summary:
        what.append(f"{summary['mc']['path']} ({summary['mc']['n']} questions)")
    print("\ndownstream: " + "; ".join(what))
    print(f"{'model':<{w}}" + "".join(f"{k:>22}" for k in keys))
    rows = [("start", summary["start_downstream"])] + [
        (name, {k[len("end_"):]: v for k, v in s.items() if k.startswith("end_")})
        for name, s in summary["losses"].items()]
    for name, vals in rows:
        print(f"{name:<{w}}" + "".join(
            f"{vals[k]:>14.3f} +- {vals[k + '_stderr']:.3f}" if k + "_stderr" in vals else f"{vals[k]:>22.3f}"
            for k in keys))
