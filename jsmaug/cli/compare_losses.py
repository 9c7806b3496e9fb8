"""The Smaug paper's experiment: DPO vs DPOP (and any other loss) from one start, on identical batches.

    jsmaug compare-losses [--config configs/tiny_dpop.yaml] [--losses dpo dpop sft ...] \
        [--init_from CKPT | --sft_steps 150] [--steps 120] [--out runs/compare] \
        [--generate TEST.jsonl [--num_fewshot K --fewshot_file F] [--chat_template tokenizer] \
         [--max_new_tokens 256]] [--mc MC.jsonl] [key=value ...]

A loss is a name of `jsmaug.losses` (TRL's, `dpo`, `dpop`, `simpo`, `cpo`, `orpo`), optionally with its own
hyper-parameters after `@`: `simpo@beta=2.0@simpo_gamma=0.5`, `exo_pair@label_smoothing=0.01` (each becomes a
`loss.key=value` override of that run only; the run's folder and label are the whole string).

1. The start: --init_from (a converter checkpoint or a training workdir), or an SFT warm-up of --sft_steps steps
   in OUT/start_sft (loss.type=sft on the chosen completions of the config's training data) from the config's
   model, so the start already gives the chosen answers a reasonable likelihood, as the paper's models did.
2. One training run per loss from that start, with the same seed, so step i sees the same batch in every run
   (a batch is a pure function of data, seed and step). Everything else comes from --config and the overrides.
3. The start and every final policy are scored on the eval split (`jsmaug.eval.preference_eval`, the start as
   the reference); with --generate, by greedy generation on GSM8K-layout problems (`jsmaug.eval.gsm8k_eval`:
   exact match, strict and flexible, as lm-evaluation-harness scores gsm8k), and with --mc by multiple-choice
   accuracy (acc, acc_norm). A --generate question that appears in a training pair is an error (checked before
   any training): the held-out problems must be unseen.

Writes OUT/compare_losses.png (train logps of chosen and rejected completions and preference accuracy over
steps, eval points as markers) and OUT/summary.json (per loss: start and end chosen / rejected logps on the
eval split, eval reward accuracy, the fraction of eval pairs whose chosen logp fell; with --generate / --mc the
start and end exact match and accuracy, and a fourth panel of them in the figure; the CPU seconds). The
per-row completions of every model are in OUT/scores/<name>.json (reused when rerun with the same settings).
Runs live in OUT/<loss>; rerunning with the same OUT resumes or reuses finished runs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

from jsmaug import eval as eval_lib, losses  # noqa: E402
from jsmaug.data import batches as data_lib, tokenizer_folder
from jsmaug.data.files import read_rows
from jsmaug.models.config import ConfigError  # noqa: E402
from jsmaug.train import checkpoint, metrics_log, run as train
from jsmaug.train.config import load_run_config  # noqa: E402
from jsmaug.cli.compare_losses_report import plot, print_table  # noqa: E402

# The SFT warm-up's folder: not a loss name, so `--losses sft` (the `sft` loss) gets its own run.
START = "start_sft"
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


def _run(config_path: str, overrides: list[str], extra: list[str]) -> None:
    cfg, raw = load_run_config(config_path, overrides + extra)
    train.run(cfg, raw)


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
    # compare-losses scores every final policy on the eval split itself; the trainer's own final eval repeats it.
    no_eval = ["data.eval_path=null"] if args.no_trainer_eval else []
    for spec, (name, extra) in specs.items():
        print(f"== {spec}: {args.steps} steps from {start} -> {out / spec}", flush=True)
        _run(args.config, args.overrides,
             common + no_eval + [f"loss.type={name}", f"train.steps={args.steps}", f"workdir={out / spec}",
                                 f"init_from={start}", *extra])
        runs[spec] = out / spec
    return start, runs


def _strings(x):
    """Every string inside a row (prompt, chosen, rejected, message contents)."""
    if isinstance(x, str):
        yield x
    elif isinstance(x, dict):
        for v in x.values():
            yield from _strings(v)
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _strings(v)


def check_held_out(rows: list[dict], path: str, train_paths) -> None:
    """A --generate question found in a training row (or a few-shot file) would be scored as held out while seen."""
    texts = []
    for tp in [train_paths] if isinstance(train_paths, str) else list(train_paths or []):
        texts += [(where, "\n".join(_strings(row))) for where, row in read_rows(tp) if not isinstance(row, Exception)]
    for i, row in enumerate(rows):
        question = row["question"].strip()
        seen = next((where for where, text in texts if question in text), None)
        if seen is not None:
            raise ConfigError(f"--generate: {row.get('where', f'{path} row {i + 1}')}: its question is in the "
                              f"training data ({seen}); the held-out problems must not appear in any training pair")


def downstream_inputs(args, base) -> dict:
    """The --generate / --mc rows, read and checked before any training starts."""
    inputs: dict = {}
    if args.generate:
        inputs["generate"] = eval_lib.read_gsm8k(args.generate)
        if args.num_fewshot and not args.fewshot_file:
            raise ConfigError("--num_fewshot > 0 needs --fewshot_file (solved GSM8K-layout rows)")
        if args.fewshot_file:
            inputs["fewshot"] = eval_lib.read_gsm8k(args.fewshot_file)
        check_held_out(inputs["generate"], args.generate, [base.data.train_path] + (
            [args.fewshot_file] if args.fewshot_file else []))
    if args.mc:
        inputs["mc"] = eval_lib.read_multiple_choice(args.mc)
    return inputs


def _sha1(path: str | None) -> str | None:
    return hashlib.sha1(Path(path).read_bytes()).hexdigest() if path else None


def downstream(args, config, params, tok, inputs: dict, cache: Path, model_key: dict) -> dict:
    """Exact match by generation (--generate) and multiple-choice accuracy (--mc) of one model. The scores and
    every row's completion go to `cache`; a rerun with the same model and settings reads them back."""
    key = {"model": model_key, "generate": args.generate, "generate_sha1": _sha1(args.generate),
           "num_fewshot": args.num_fewshot, "fewshot_sha1": _sha1(args.fewshot_file),
           "chat_template": args.chat_template, "max_new_tokens": args.max_new_tokens,
           "mc": args.mc, "mc_sha1": _sha1(args.mc)}
    if cache.is_file():
        old = json.loads(cache.read_text())
        if old.get("key") == key:
            print(f"   reusing {cache}", flush=True)
            return old["scores"]
    scores: dict = {}
    if "generate" in inputs:
        t0 = time.time()
        scores["generate"] = eval_lib.gsm8k_eval(
            config, params, tok, inputs["generate"], num_fewshot=args.num_fewshot,
            fewshot_rows=inputs.get("fewshot"), chat_template=args.chat_template,
            max_new_tokens=args.max_new_tokens, batch_size=args.gen_batch_size)
        scores["generate"]["seconds"] = round(time.time() - t0, 1)
    if "mc" in inputs:
        mc = eval_lib.multiple_choice_eval(config, params, tok, inputs["mc"])
        scores["mc"] = {k: mc[k] for k in ("acc", "acc_norm")} | {"n": len(inputs["mc"]),
                                                                   "per_row": mc.get("per_row")}
    eval_lib.write_json(cache, {"key": key, "scores": scores})
    return scores


def _last_step(workdir: Path) -> int | None:
    recs = [r for r in metrics_log.read_metrics(workdir / "metrics.jsonl") if "step" in r] \
        if (workdir / "metrics.jsonl").is_file() else []
    return recs[-1]["step"] if recs else None


def with_reference(policy: dict, ref: dict, beta: float) -> dict:
    """`preference_eval`'s reference figures from two reference-free evaluations of the same examples (the
    policy's and the start's), so the start's log-probs are computed once instead of once per model."""
    import numpy as np

    pc, pr = (np.asarray(policy["per_pair"][k]) for k in ("policy_chosen", "policy_rejected"))
    rc, rr = (np.asarray(ref["per_pair"][k]) for k in ("policy_chosen", "policy_rejected"))
    reward_c, reward_r = beta * (pc - rc), beta * (pr - rr)
    return {**policy, "rewards/chosen": float(reward_c.mean()), "rewards/rejected": float(reward_r.mean()),
            "rewards/accuracies": float((reward_c > reward_r).mean()),
            "rewards/margins": float((reward_c - reward_r).mean()),
            "reference/logps/chosen": float(rc.mean()), "reference/logps/rejected": float(rr.mean()),
            "chosen_logps_decreased": float((pc < rc).mean())}


def score(args, base, start: str, runs: dict[str, Path], inputs: dict, out: Path) -> dict[str, dict]:
    """The start and every final policy on the eval split (the start as the reference), and downstream."""
    tok = data_lib.Tokenizer(tokenizer_folder.run_tokenizer_path(base.data.tokenizer_path, str(start)))
    examples, _ = data_lib.prepare(base.data.eval_path, base.data, tok)
    config, start_params = checkpoint.load_params(start)
    scored, ref = {}, None
    for name, path in [("start", Path(start)), *runs.items()]:
        params = start_params if name == "start" else checkpoint.load_params(path)[1]
        print(f"== scoring {name}", flush=True)
        plain = eval_lib.preference_eval(config, params, examples)
        ref = ref or plain
        scored[name] = with_reference(plain, ref, base.loss.beta)
        if inputs:
            scored[name]["downstream"] = downstream(
                args, config, params, tok, inputs, out / "scores" / f"{name}.json",
                {"path": str(path.resolve()), "step": _last_step(path)})
        del params
    return scored


def downstream_columns(s0: dict, s: dict) -> dict:
    """start_/end_ exact match (strict, flexible) and multiple-choice accuracy (acc, acc_norm), where scored."""
    cols = {}
    for tag, sc in (("start", s0.get("downstream", {})), ("end", s.get("downstream", {}))):
        if "generate" in sc:
            for short, name in (("strict", "strict-match"), ("flexible", "flexible-extract")):
                cols[f"{tag}_exact_match_{short}"] = sc["generate"][f"exact_match,{name}"]
                cols[f"{tag}_exact_match_{short}_stderr"] = sc["generate"][f"exact_match_stderr,{name}"]
        if "mc" in sc:
            cols[f"{tag}_mc_acc"], cols[f"{tag}_mc_acc_norm"] = sc["mc"]["acc"], sc["mc"]["acc_norm"]
    return cols


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
            **downstream_columns(s0, s),
        }
    if args.generate:
        g = s0["downstream"]["generate"]
        summary["generate"] = {"path": args.generate, "n": g["n"], "num_fewshot": args.num_fewshot,
                               "fewshot_file": args.fewshot_file, "chat_template": args.chat_template,
                               "max_new_tokens": args.max_new_tokens, "greedy": True}
    if args.mc:
        summary["mc"] = {"path": args.mc, "n": s0["downstream"]["mc"]["n"]}
    if args.generate or args.mc:
        summary["start_downstream"] = {k[len("start_"):]: v for k, v in downstream_columns(s0, s0).items()
                                       if k.startswith("start_")}
    return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/tiny_dpop.yaml")
    ap.add_argument("--losses", nargs="+", default=["dpo", "dpop"])
    ap.add_argument("--init_from", default=None, help="the start (skips the SFT warm-up)")
    ap.add_argument("--sft_steps", type=int, default=150)
    ap.add_argument("--sft_learning_rate", type=float, default=None, help="default: the config's")
    ap.add_argument("--steps", type=int, default=120, help="steps of every preference run")
    ap.add_argument("--out", default="runs/compare")
    ap.add_argument("--no_trainer_eval", action="store_true",
                    help="the loss runs skip the trainer's eval of the eval split (scored here anyway): two "
                         "forwards of the split fewer per run, and no eval markers in the figure")
    ap.add_argument("--generate", default=None, metavar="TEST.jsonl",
                    help="GSM8K-layout problems (question, answer ending '#### N') scored by greedy generation, "
                         "start and end; none of their questions may be in the training data")
    ap.add_argument("--num_fewshot", type=int, default=0, help="solved examples before each --generate prompt")
    ap.add_argument("--fewshot_file", default=None, help="GSM8K-layout rows the few-shot examples come from")
    ap.add_argument("--chat_template", default=None,
                    help="'tokenizer' (the model's own) or a Jinja file: --generate prompts as chat turns, "
                         "as lm-eval's --apply_chat_template does; default: plain 'Question: ...\\nAnswer:' text")
    ap.add_argument("--max_new_tokens", type=int, default=256)
    ap.add_argument("--gen_batch_size", type=int, default=8)
    ap.add_argument("--mc", default=None, metavar="MC.jsonl", help="multiple-choice rows scored start and end")
    ap.add_argument("overrides", nargs="*", help="key=value overrides of the config, for every run")
    args = ap.parse_args(argv)
    args.losses, args.overrides = split_overrides(args.losses, args.overrides)
    out = Path(args.out)
    t_all, cpu_all = time.time(), time.process_time()
    try:
        try:
            specs = {spec: parse_loss(spec) for spec in args.losses}
        except ValueError as err:
            raise ConfigError(f"--losses: {err}") from None
        base, _ = load_run_config(args.config, args.overrides)
        if not base.data.eval_path:
            raise ConfigError("data.eval_path: the comparison scores every run on the eval split; set one")
        inputs = downstream_inputs(args, base) if (args.generate or args.mc) else {}
        start, runs = train_runs(args, specs, out)
        scored = score(args, base, start, runs, inputs, out)
    except (ConfigError, data_lib.DataError, checkpoint.CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    summary = summarize(args, base, start, runs, scored)
    # CPU time of this process, every thread (XLA's and the tokenizers') included; runs reused from an earlier
    # invocation cost nothing here.
    summary["seconds"] = round(time.time() - t_all, 1)
    summary["cpu_seconds"] = round(time.process_time() - cpu_all, 1)
    plot(runs, out / "compare_losses.png",
         f"{args.config}: {', '.join(args.losses)} from {start}, {args.steps} steps, identical batches",
         summary["start_eval"], summary)
    eval_lib.write_json(out / "summary.json", summary)
    print_table(summary)
    print(f"wrote {out / 'compare_losses.png'} and {out / 'summary.json'} (wall {summary['seconds']} s, "
          f"CPU {summary['cpu_seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
