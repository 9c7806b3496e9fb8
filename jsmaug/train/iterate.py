"""`jsmaug iterate`: rounds of pairs the model makes itself. Each round samples with the current policy, makes pairs
(`jsmaug pairs sample`), trains on them from that policy (the config's loss, DPOP in the shipped configs), and
scores the new policy on held-out GSM8K-layout problems (`jsmaug.eval.gsm8k_eval`); the next round starts from it.

    jsmaug iterate CONFIG --rounds 3 --problems train.jsonl --heldout test.jsonl --out runs/iter \
        [--init_from CKPT] [--k 8 --temperature 0.7 --top_p 0.95 --max_new_tokens 256 --verifier gsm8k \
         --rule likely --pairs_per_problem 1 --seed 0] [--heldout_max_new_tokens 256 --num_fewshot 0 \
         --fewshot_file F] [key=value ...]

The key=value overrides go to every round's training run (`loss.type=dpo`, `train.steps=50`, ...); the config's
`data.chat_template` and `data.tokenizer_path` are used for sampling too. The first round starts from
`--init_from` (or the config's `init_from`).

OUT/round_0/heldout.json       the start's held-out scores
OUT/round_R/pairs.jsonl        round R's pairs (sampled with seed 1000 * --seed + R)
OUT/round_R/train/             its training run (workdir: checkpoints, metrics, hf/ export); its reference is the
                               round's start, whose log-probs the pairs keep: the run reads them
                               (`reference.mode=precomputed`, unless an override sets reference.mode)
OUT/round_R/heldout.json       the trained policy's held-out scores
OUT/summary.json, the table    per round: share of correct samples, pairs, problems skipped, the last training
                               window's chosen / rejected log-probs, held-out exact match (strict, flexible, with
                               lm-eval's standard errors), and the round's CPU and wall seconds
OUT/iterate.png                those figures over rounds

Cost: each stage keeps its own wall and CPU seconds (`time.process_time`: every thread of this process, model
loading and compiles included) in its output file (`cost` in heldout.json, pairs_summary.json, train/done.json),
so a resumed run reports what the stages took when they ran.

Resume: run the same command again. A stage whose output exists is skipped (the pairs' file and the held-out
scores are written atomically; a round's training is done once `train/done.json` exists); an interrupted
sampling resumes from `pairs.jsonl.partial`, an interrupted training from its last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from jsmaug import paths
from jsmaug.data import formats
from jsmaug.data.files import DataError
from jsmaug.data.tokenizer import Tokenizer
from jsmaug.data.tokenizer_folder import run_tokenizer_path
from jsmaug.errors import CheckpointError, ConfigError
from jsmaug.pairs import sample as sample_lib, verify
from jsmaug.parallel import distributed
from jsmaug.train import metrics_log, run as train
from jsmaug.train.config import load_run_config


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="jsmaug iterate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", help="a training config (a path or a shipped name)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides of every round's training run")
    ap.add_argument("--rounds", type=int, required=True)
    ap.add_argument("--problems", required=True, help="the problems sampled every round")
    ap.add_argument("--heldout", default=None, help="GSM8K-layout held-out problems (jsmaug.eval.read_gsm8k)")
    ap.add_argument("--out", required=True, help="the folder of the rounds")
    ap.add_argument("--init_from", default=None, help="the first round's policy, a converter checkpoint or a "
                    "training workdir (`jsmaug convert` an HF folder first; default: the config's init_from)")
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--top_p", type=float, default=0.95)
    ap.add_argument("--top_k", type=int, default=0)
    ap.add_argument("--max_new_tokens", type=int, default=256)
    ap.add_argument("--verifier", default="gsm8k")
    ap.add_argument("--threshold", type=float, default=1.0)
    ap.add_argument("--rule", choices=sample_lib.RULES, default="likely")
    ap.add_argument("--pairs_per_problem", type=int, default=1)
    ap.add_argument("--batch_size", type=int, default=64,
                    help="rows per sampling call: the k samples of batch_size // k problems (at least one)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--heldout_max_new_tokens", type=int, default=256)
    ap.add_argument("--heldout_batch_size", type=int, default=8)
    ap.add_argument("--num_fewshot", type=int, default=0)
    ap.add_argument("--fewshot_file", default=None)
    ap.add_argument("--quiet", action="store_true", help="no sampling / evaluation progress lines")
    return ap


def _tokenizer(cfg, start: str) -> tuple[Tokenizer, Any]:
    """The tokenizer and chat template the trainer will use for a run from `start`."""
    tok = Tokenizer(run_tokenizer_path(cfg.data.tokenizer_path, start))
    return tok, formats.load_chat_template(cfg.data.chat_template, tok)


class Cost:
    """A stage's wall and CPU seconds (CPU: `time.process_time`, every thread of the process)."""

    def __enter__(self):
        self.wall0, self.cpu0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall_s, self.cpu_s = time.perf_counter() - self.wall0, time.process_time() - self.cpu0

    def as_dict(self) -> dict:
        return {"wall_s": round(self.wall_s, 2), "cpu_s": round(self.cpu_s, 2)}


def heldout_scores(args, cfg, model: str, out: Path) -> dict | None:
    """`model`'s gsm8k_eval on --heldout, written to `out` (reused when it exists)."""
    from jsmaug import eval as ev

    if args.heldout is None:
        return None
    if out.exists():
        return json.loads(out.read_text())
    cost = Cost().__enter__()
    tok, template = _tokenizer(cfg, model)
    config, params = ev.load_model(model)
    fewshot = ev.read_gsm8k(args.fewshot_file) if args.fewshot_file else None
    res = ev.gsm8k_eval(config, params, tok, ev.read_gsm8k(args.heldout), num_fewshot=args.num_fewshot,
                        fewshot_rows=fewshot, chat_template=template, max_new_tokens=args.heldout_max_new_tokens,
                        batch_size=args.heldout_batch_size, progress=not args.quiet)
    cost.__exit__()
    res = dict(res, model=str(model), cost=cost.as_dict())
    ev.write_json(out, res)
    return res


def sample_round(args, cfg, start: str, r: int, folder: Path) -> dict:
    """Round r's pairs from `start` (reused when pairs.jsonl exists); the summary's counts."""
    from jsmaug import eval as ev

    out, summary_path = folder / "pairs.jsonl", folder / "pairs_summary.json"
    if out.exists() and summary_path.exists():
        return json.loads(summary_path.read_text())
    cost = Cost().__enter__()
    tok, template = _tokenizer(cfg, start)
    verifier = verify.Verifier(args.verifier, args.threshold)
    problems = verify.read_problems(args.problems, verifier.kind)
    opts = sample_lib.Options(k=args.k, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                              max_new_tokens=args.max_new_tokens, seed=1000 * args.seed + r,
                              pairs_per_problem=args.pairs_per_problem, rule=args.rule, batch_size=args.batch_size)
    config, params = ev.load_model(start)
    settings = {"model": str(start), "input": str(args.problems),
                "input_digest": sample_lib.file_digest(args.problems), "tokenizer": tok.fingerprint(),
                "chat_template": template.source if template is not None else None}
    mesh_config = cfg.mesh  # the run config's mesh, the one training uses
    summary = sample_lib.run(config, params, tok, problems, verifier, out, opts, template=template,
                             settings=settings, progress=not args.quiet, mesh_config=mesh_config).as_dict()
    cost.__exit__()
    summary["cost"] = cost.as_dict()
    paths.atomic_write(summary_path, json.dumps(summary, indent=1))
    return summary


def train_round(args, start: str, folder: Path, pairs: Path) -> dict:
    """Round r's training run from `start` on its pairs (resumed from its checkpoints when interrupted)."""
    workdir, done = folder / "train", folder / "train" / "done.json"
    if done.exists():
        return json.loads(done.read_text())
    cost = Cost().__enter__()
    # The pairs keep the sampling model's log-probs, and the round's reference is that model: the trainer reads
    # them (reference_cache.pairs_reference) instead of running the reference, unless the overrides say otherwise.
    mode = [] if any(o.startswith("reference.mode=") for o in args.overrides) else ["reference.mode=precomputed"]
    cfg, raw = load_run_config(args.config, mode + list(args.overrides) + [
        f"workdir={workdir}", f"init_from={start}", f"data.train_path={pairs}", "data.eval_path=null"])
    result = train.run(cfg, raw)
    records = [r for r in metrics_log.read_metrics(workdir / "metrics.jsonl", drop_torn_last=True)
               if "logps/chosen" in r]
    if records:
        result.update({k: records[-1][k] for k in ("logps/chosen", "logps/rejected") if k in records[-1]})
    cost.__exit__()
    result["cost"] = cost.as_dict()  # this invocation's: a resumed run's earlier part is not counted
    paths.atomic_write(done, json.dumps(result, indent=1, default=float))
    return result


def table(rows: list[dict]) -> str:
    head = ["round", "correct", "pairs", "no correct", "no wrong", "logps/chosen", "logps/rejected",
            "heldout strict", "heldout flexible", "CPU s"]

    def fmt(v, spec):
        return "-" if v is None else format(v, spec)

    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in rows:
        lines.append(" | ".join([str(r["round"]), fmt(r.get("share_correct"), ".3f"), fmt(r.get("pairs"), "d"),
                                 fmt(r.get("no_correct"), "d"), fmt(r.get("no_wrong"), "d"),
                                 fmt(r.get("logps/chosen"), ".2f"), fmt(r.get("logps/rejected"), ".2f"),
                                 fmt(r.get("heldout_strict"), ".3f"), fmt(r.get("heldout_flexible"), ".3f"),
                                 fmt(r.get("cpu_s"), ".0f")]))
    return "\n".join(lines)


def plot(rows: list[dict], out_png: Path) -> None:
    """One panel per figure of the table, over rounds (round 0: the start's held-out scores)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("share_correct", "share of correct samples"), ("pairs", "pairs made"),
              ("heldout_flexible", "held-out exact match (flexible)"), ("logps/chosen", "train logps (chosen)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(16, 3.6))
    for ax, (key, title) in zip(axes, panels):
        got = [(r["round"], r[key]) for r in rows if r.get(key) is not None]
        ax.plot([x for x, _ in got], [y for _, y in got], "o-")
        if key == "heldout_flexible":
            strict = [(r["round"], r["heldout_strict"]) for r in rows if r.get("heldout_strict") is not None]
            ax.plot([x for x, _ in strict], [y for _, y in strict], "s--", label="strict")
            ax.plot([], [], "o-", color="tab:blue", label="flexible")
            ax.legend()
        ax.set_title(title)
        ax.set_xlabel("round")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    paths.atomic_write(out_png, buf.getvalue())


def _heldout_row(res: dict | None) -> dict:
    if res is None:
        return {}
    return {"heldout_strict": res["exact_match,strict-match"], "heldout_flexible": res["exact_match,flexible-extract"],
            "heldout_strict_stderr": res["exact_match_stderr,strict-match"],
            "heldout_flexible_stderr": res["exact_match_stderr,flexible-extract"],
            "heldout_n": res["n"], "cpu_heldout": (res.get("cost") or {}).get("cpu_s")}


def _round_cost(row: dict, **costs) -> None:
    """The row's per-stage CPU seconds (`cpu_sample`, `cpu_train`, `cpu_heldout`) and their sum `cpu_s`."""
    for stage, cost in costs.items():
        row[f"cpu_{stage}"] = (cost or {}).get("cpu_s")
    parts = [row.get(f"cpu_{s}") for s in ("sample", "train", "heldout")]
    row["cpu_s"] = sum(p for p in parts if p is not None) if any(p is not None for p in parts) else None


def iterate(args) -> list[dict]:
    """Every round (module docstring); the summary rows, round 0 being the start."""
    if args.rounds < 1:
        raise ConfigError(f"--rounds must be at least 1, got {args.rounds}")
    cfg, _ = load_run_config(args.config, list(args.overrides) + ["data.train_path=" + str(args.problems)])
    start = args.init_from or cfg.init_from
    if not start:
        raise ConfigError("give --init_from (or init_from in the config): the first round samples with it")
    verify.read_problems(args.problems, verify.Verifier(args.verifier, args.threshold).kind)  # checked up front
    if args.heldout:
        from jsmaug import eval as ev
        ev.read_gsm8k(args.heldout)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "round_0").mkdir(exist_ok=True)
    rows = [{"round": 0, "model": str(start), **_heldout_row(heldout_scores(args, cfg, start,
                                                                             out / "round_0" / "heldout.json"))}]
    _round_cost(rows[0])
    for r in range(1, args.rounds + 1):
        folder = out / f"round_{r}"
        folder.mkdir(exist_ok=True)
        counts = sample_round(args, cfg, start, r, folder)
        row: dict[str, Any] = {"round": r, "start": str(start), **{k: counts[k] for k in (
            "share_correct", "pairs", "no_correct", "no_wrong", "samples")}}
        result = None
        if counts["pairs"]:
            result = train_round(args, start, folder, folder / "pairs.jsonl")
            row.update({k: result.get(k) for k in ("logps/chosen", "logps/rejected", "seconds")})
            start = str(folder / "train")
        else:
            print(f"iterate: round {r} made no pairs; the policy stays {start}", file=sys.stderr)
        row["model"] = str(start)
        row.update(_heldout_row(heldout_scores(args, cfg, start, folder / "heldout.json")))
        _round_cost(row, sample=counts.get("cost"), train=(result or {}).get("cost"))
        rows.append(row)
        paths.atomic_write(out / "summary.json", json.dumps(rows, indent=1, default=float))
        plot(rows, out / "iterate.png")
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_intermixed_args(argv)
    try:
        rows = iterate(args)
    except (ConfigError, DataError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return distributed.EXIT_ERROR
    except distributed.Preempted:
        return distributed.EXIT_PREEMPTED
    print(table(rows))
    return 0
