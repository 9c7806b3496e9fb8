"""lm-evaluation-harness against `tools/evaluate.py --mc` on one HF export: the per-choice log-likelihoods and
acc / acc_norm of every question, side by side.

    pip install "lm_eval==0.4.13"
    python tools/compare_lm_eval.py --model runs/tiny_dpop/hf [--mc data/sample/mc.jsonl]

The multiple-choice file becomes a local lm-eval task (`output_type: multiple_choice`, the query as the context,
the choices as continuations), so nothing is downloaded. Prints the largest log-likelihood difference and on
how many questions acc and acc_norm agree; exits 1 if any log-likelihood differs by more than --tolerance.
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

TASK = """task: jsmaug_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{query}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="an HF folder with its tokenizer files (a jsmaug export)")
    ap.add_argument("--mc", default="data/sample/mc.jsonl", help="JSONL of query / choices / gold")
    ap.add_argument("--tolerance", type=float, default=1e-4)
    args = ap.parse_args(argv)
    lm_eval = shutil.which("lm_eval") or str(Path(sys.executable).parent / "lm_eval")
    if not Path(lm_eval).exists():
        print("error: lm_eval is not installed (pip install 'lm_eval==0.4.13')", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "jsmaug_mc.yaml").write_text(TASK.format(path=Path(args.mc).resolve()))
        env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
        subprocess.run([lm_eval, "--model", "hf", "--model_args", f"pretrained={args.model},dtype=float32",
                        "--include_path", tmp, "--tasks", "jsmaug_mc", "--batch_size", "4", "--log_samples",
                        "--output_path", f"{tmp}/out", "--device", "cpu"], check=True, env=env)
        samples = sorted(glob.glob(f"{tmp}/out/**/samples_jsmaug_mc*.jsonl", recursive=True))[-1]
        theirs = sorted((json.loads(x) for x in open(samples)), key=lambda r: r["doc_id"])
        subprocess.run([sys.executable, str(ROOT / "tools" / "evaluate.py"), "--model", args.model, "--mc", args.mc,
                        "--out", f"{tmp}/ours.json"], check=True, capture_output=True)
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


if __name__ == "__main__":
    sys.exit(main())
