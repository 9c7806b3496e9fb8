"""A run's step programs (jsmaug/train/programs.py): every batch shape its steps need is compiled before the first
step and named in the log, and the loop itself compiles no train step."""

import json
import subprocess
import sys
from pathlib import Path

from cli_env import cli_env

from jsmaug.train import programs

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["model.hidden_size=32", "model.intermediate_size=32", "model.num_hidden_layers=2", "data.max_length=48",
         "data.max_prompt_length=16", "train.batch_size=4", "train.warmup_steps=0", "train.schedule=constant",
         "log.every=1", "log.tensorboard=false", "export_hf=false", "checkpoint.every=100", "data.eval_path=null"]


def test_a_packed_run_compiles_every_shape_ahead_and_none_in_the_loop(tmp_path):
    """`python -m jsmaug.train` with packing, as a user runs it (JAX_LOG_COMPILES on): the log names each shape
    compiled ahead with the steps that need it, the process compiles the train step that many times, all before
    step 1, and the result says how long that took."""
    rows = [{"prompt": f"Q{i}: what is {i} plus {i}?", "chosen": " " + "yes " * (1 + 7 * (i % 3)),
             "rejected": f" {2 * i + 1}"} for i in range(12)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["configs/tiny_dpo.yaml", *SMALL, f"data.train_path={tmp_path / 'pairs.jsonl'}", f"workdir={tmp_path / 'w'}",
            "train.steps=3", "data.packing=true", "data.packing_compile_steps=0"]
    r = subprocess.run([sys.executable, "-m", "jsmaug.train", *args], cwd=ROOT, env=cli_env(1, JAX_LOG_COMPILES="1"),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout.splitlines()
    ahead = next(x for x in out if x.startswith("compiling the train step ahead for "))
    n = int(ahead.split(" for ")[1].split()[0])
    shapes = [x for x in out if x.startswith("  (1, ")]
    assert n == len(shapes) >= 1 and "those of steps 1-3" in ahead, r.stdout
    assert sum(int(x.split("; ")[1].split()[0]) for x in shapes) == 3  # each step's shape, counted once
    compiles = [x for x in r.stderr.splitlines() if "Compiling jit(train_step)" in x]
    assert len(compiles) == n, compiles  # the ahead compiles, and no other
    assert "not compiled ahead" not in r.stdout and "compilation cache: " in r.stdout
    done = next(x for x in out if x.startswith("done: "))
    assert "'compile_ahead_seconds': " in done and "'steps': 3" in done


def test_a_shape_met_first_in_the_loop_is_named_once():
    lines = []
    log = programs.ShapeLog(lines.append)
    log.shapes.add((1, 2, 64))
    log.seen(1, (1, 2, 64))
    log.seen(5, (1, 3, 64))
    log.seen(6, (1, 3, 64))
    assert len(lines) == 1 and lines[0].startswith("step 5: batch shape (1, 3, 64) was not compiled ahead")
