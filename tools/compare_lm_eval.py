"""lm-evaluation-harness 0.4.13 against `jsmaug evaluate` on one HF export, row by row.

    pip install "lm_eval==0.4.13"
    python tools/compare_lm_eval.py --model runs/tiny_dpop/hf [--mc data/sample/mc.jsonl]
    python tools/compare_lm_eval.py --model EXPORT --generate test.jsonl \
        [--num_fewshot 5 --fewshot_file train.jsonl] [--max_new_tokens 256] [--chat_template]

--mc: the multiple-choice file becomes a local lm-eval task (`output_type: multiple_choice`, the query as the
context, the choices as continuations). Prints the largest log-likelihood difference and on how many questions
acc and acc_norm agree; exits 1 if any log-likelihood differs by more than --tolerance.

--generate: a GSM8K-layout file becomes a copy of lm-eval's own `gsm8k` task (its installed gsm8k.yaml: prompt,
stop sequences, filters, metric) reading the local file (`dataset_path: json`; the few-shot examples from
`--fewshot_file` as its `fewshot_split`). `lm_eval --model hf` (float32, --log_samples) and `jsmaug evaluate
--generate` run on it; every row's prompt, completion and both extracted answers, and the two exact-match
figures with their standard errors, are compared. Exits 1 on any difference.

Nothing is downloaded (HF_HUB_OFFLINE=1, HF_DATASETS_OFFLINE=1).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

MC_TASK = """task: jsmaug_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
{fewshot}test_split: test
output_type: multiple_choice
num_fewshot: {k}
doc_to_text: "{{{{query}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""

GEN_TASK_NAME = "jsmaug_gsm8k"


def gsm8k_task_yaml(test_file: str | Path, fewshot_file: str | Path | None = None, num_fewshot: int = 0,
                    max_gen_toks: int | None = None) -> str:
    """lm-eval's installed gsm8k.yaml, reading `test_file` (and `fewshot_file` as its few-shot split)."""
    import lm_eval
    import yaml

    cfg = yaml.safe_load((Path(lm_eval.__file__).parent / "tasks" / "gsm8k" / "gsm8k.yaml").read_text())
    for key in ("tag", "dataset_name", "training_split", "fewshot_split"):
        cfg.pop(key, None)
    files = {"test": str(Path(test_file).resolve())}
    if num_fewshot:
        files["train"] = str(Path(fewshot_file).resolve())
        cfg["fewshot_split"] = "train"
    cfg.update(task=GEN_TASK_NAME, dataset_path="json", dataset_kwargs={"data_files": files}, test_split="test",
               num_fewshot=num_fewshot)
    if max_gen_toks is not None:
        cfg["generation_kwargs"] = dict(cfg["generation_kwargs"], max_gen_toks=max_gen_toks)
    return yaml.safe_dump(cfg, sort_keys=False)


def _lm_eval_binary() -> str | None:
    path = shutil.which("lm_eval") or str(Path(sys.executable).parent / "lm_eval")
    return path if Path(path).exists() else None


def _env() -> dict:
    return dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def run_lm_eval(model: str, task_dir: str, task: str, out_dir: str, batch_size: int = 4,
                chat_template: bool = False) -> tuple[list[dict], dict]:
    """(samples sorted by doc_id, the task's results) of `lm_eval --model hf` on a local task."""
    cmd = [_lm_eval_binary() or "lm_eval", "--model", "hf", "--model_args", f"pretrained={model},dtype=float32",
           "--include_path", task_dir, "--tasks", task, "--batch_size", str(batch_size), "--log_samples",
           "--output_path", out_dir, "--device", "cpu"]
    if chat_template:
        cmd.append("--apply_chat_template")
    subprocess.run(cmd, check=True, env=_env())
    samples = sorted(glob.glob(f"{out_dir}/**/samples_{task}*.jsonl", recursive=True))[-1]
    results = sorted(glob.glob(f"{out_dir}/**/results*.json", recursive=True))[-1]
    theirs = sorted((json.loads(x) for x in open(samples)), key=lambda r: r["doc_id"])
    return theirs, json.load(open(results))["results"][task]


def compare_generate(theirs: list[dict], their_figures: dict, ours: dict) -> list[str]:
    """Every difference between lm-eval's samples / figures and a jsmaug gsm8k result dict (empty: agree)."""
    diffs = []
    if len(theirs) != len(ours["rows"]):
        return [f"lm-eval scored {len(theirs)} rows, jsmaug {len(ours['rows'])}"]
    for t, o in zip(theirs, ours["rows"]):
        i = t["doc_id"]
        prompt = t["arguments"]["gen_args_0"]["arg_0"] if isinstance(t["arguments"], dict) else t["arguments"][0][0]
        completion = t["resps"][0][0]
        if prompt != o["prompt"]:
            diffs.append(f"row {i}: prompts differ:\n  lm-eval {prompt!r}\n  jsmaug  {o['prompt']!r}")
        if completion != o["completion"]:
            diffs.append(f"row {i}: completions differ:\n  lm-eval {completion!r}\n  jsmaug  {o['completion']!r}")
    for key in ("exact_match,strict-match", "exact_match,flexible-extract"):
        skey = key.replace(",", "_stderr,")
        their_se = their_figures.get(skey)
        their_se = None if their_se == "N/A" else their_se
        if not np.isclose(their_figures[key], ours[key], rtol=0, atol=1e-12):
            diffs.append(f"{key}: lm-eval {their_figures[key]}, jsmaug {ours[key]}")
        if (their_se is None) != (ours[skey] is None) or (their_se is not None and
                                                          not np.isclose(their_se, ours[skey], rtol=0, atol=1e-12)):
            diffs.append(f"{skey}: lm-eval {their_se}, jsmaug {ours[skey]}")
    return diffs


def per_row_scores(theirs: list[dict], ours: dict) -> list[str]:
    """Rows whose strict / flexible score differs (lm-eval logs one sample per filter)."""
    diffs = []
    for t in theirs:
        o = ours["rows"][t["doc_id"]]
        for key in ("exact_match",):
            name = f"exact_match,{t.get('filter', 'strict-match')}"
            if name in o and float(t[key]) != float(o[name]):
                diffs.append(f"row {t['doc_id']}: {name} lm-eval {t[key]}, jsmaug {o[name]}")
    return diffs


def main_generate(args) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / f"{GEN_TASK_NAME}.yaml").write_text(
            gsm8k_task_yaml(args.generate, args.fewshot_file, args.num_fewshot, args.max_new_tokens))
        theirs, figures = run_lm_eval(args.model, tmp, GEN_TASK_NAME, f"{tmp}/out", args.batch_size,
                                      args.chat_template)
        cmd = [sys.executable, "-m", "jsmaug.cli.evaluate", "--model", args.model, "--generate", args.generate,
               "--num_fewshot", str(args.num_fewshot), "--out", f"{tmp}/ours.json", "--batch_size",
               str(args.batch_size), "--no_progress"]
        if args.fewshot_file:
            cmd += ["--fewshot_file", args.fewshot_file]
        if args.max_new_tokens is not None:
            cmd += ["--max_new_tokens", str(args.max_new_tokens)]
        if args.chat_template:
            cmd += ["--chat_template", "tokenizer"]
        subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT, env=_env())
        ours = next(iter(json.load(open(f"{tmp}/ours.json"))["results"].values()))
        if args.keep:  # both sides' outputs, for reading the completions
            shutil.copytree(tmp, args.keep, dirs_exist_ok=True)
    # lm-eval logs one sample per (doc, filter); the prompt and completion are the same in each.
    by_doc = {}
    for t in theirs:
        by_doc.setdefault(t["doc_id"], t)
    diffs = compare_generate([by_doc[i] for i in sorted(by_doc)], figures, ours) + per_row_scores(theirs, ours)
    for d in diffs:
        print(d)
    print(f"{len(by_doc)} rows: {sum(1 for i in by_doc if not any(d.startswith(f'row {i}:') for d in diffs))} "
          f"equal; exact_match strict lm-eval {figures['exact_match,strict-match']:.4f} jsmaug "
          f"{ours['exact_match,strict-match']:.4f}, flexible lm-eval {figures['exact_match,flexible-extract']:.4f} "
          f"jsmaug {ours['exact_match,flexible-extract']:.4f}; {len(diffs)} differences")
    return 1 if diffs else 0


def main_mc(args) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        fewshot = ""
        if args.num_fewshot:
            fewshot = f"    train: {Path(args.fewshot_file).resolve()}\nfewshot_split: train\n"
        (Path(tmp) / "jsmaug_mc.yaml").write_text(MC_TASK.format(path=Path(args.mc).resolve(), fewshot=fewshot,
                                                                 k=args.num_fewshot))
        theirs, _ = run_lm_eval(args.model, tmp, "jsmaug_mc", f"{tmp}/out", args.batch_size)
        cmd = [sys.executable, "-m", "jsmaug.cli.evaluate", "--model", args.model, "--mc", args.mc, "--out",
               f"{tmp}/ours.json", "--num_fewshot", str(args.num_fewshot)]
        if args.fewshot_file:
            cmd += ["--fewshot_file", args.fewshot_file]
        subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT, env=_env())
        ours = next(iter(json.load(open(f"{tmp}/ours.json"))["results"].values()))["per_row"]
    diffs, acc, acc_norm = [], 0, 0
    for t, o in zip(theirs, ours):
        lls = np.array([float(r[0][0]) for r in t["resps"]])
        diffs.append(float(np.max(np.abs(lls - np.array(o["lls"])))))
        acc += int(t["acc"] == o["acc"])
        acc_norm += int(t["acc_norm"] == o["acc_norm"])
    worst = max(diffs)
    print(f"{len(theirs)} questions: largest |log-likelihood difference| {worst:.3g} nats; acc equal on {acc}, "
          f"acc_norm equal on {acc_norm}")
    return 0 if worst <= args.tolerance and acc == acc_norm == len(theirs) else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="an HF folder with its tokenizer files (a jsmaug export)")
    ap.add_argument("--mc", default="data/sample/mc.jsonl", help="JSONL of query / choices / gold")
    ap.add_argument("--generate", default=None, help="a GSM8K-layout JSONL (question, answer with '#### N')")
    ap.add_argument("--num_fewshot", type=int, default=0)
    ap.add_argument("--fewshot_file", default=None, help="rows the few-shot examples are drawn from")
    ap.add_argument("--max_new_tokens", type=int, default=None, help="--generate: max_gen_toks (default lm-eval's)")
    ap.add_argument("--chat_template", action="store_true", help="--generate: lm-eval --apply_chat_template "
                    "(few-shot as turns) against jsmaug --chat_template tokenizer")
    ap.add_argument("--batch_size", type=int, default=4)
    ap.add_argument("--keep", default=None, help="--generate: copy the task YAML, lm-eval's output folder and "
                    "jsmaug's OUT.json (ours.json) here")
    ap.add_argument("--tolerance", type=float, default=1e-4)
    args = ap.parse_args(argv)
    if _lm_eval_binary() is None:
        print("error: lm_eval is not installed (pip install 'lm_eval==0.4.13')", file=sys.stderr)
        return 2
    if args.num_fewshot and not args.fewshot_file:
        ap.error("--num_fewshot needs --fewshot_file")
    return main_generate(args) if args.generate else main_mc(args)


if __name__ == "__main__":
    sys.exit(main())
