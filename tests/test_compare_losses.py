"""tools/compare_losses.py end to end on a tiny config: SFT warm-up, DPO and DPOP on identical batches."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from cli_env import cli_env

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["model.hidden_size=32", "model.intermediate_size=32", "data.max_length=64", "data.max_prompt_length=32",
         "train.batch_size=4", "train.warmup_steps=0", "train.schedule=constant", "log.every=1",
         "log.tensorboard=false", "log.eval_every=0", "data.eval_path=data/sample/test.jsonl"]


def _tool(args, out):
    return subprocess.run([sys.executable, "tools/compare_losses.py", "--out", str(out), *args], cwd=ROOT, env=cli_env(),
                          capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    r = _tool(["--sft_steps", "2", "--steps", "3", "--losses", "dpo", "dpop", *SMALL], out)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out, json.loads((out / "summary.json").read_text()), r.stdout


def test_runs_share_start_and_batches(compared):
    out, summary, _ = compared
    dpo, dpop = summary["losses"]["dpo"], summary["losses"]["dpop"]
    assert dpo["start_chosen_logps"] == dpop["start_chosen_logps"]
    # Same start, same first batch: step 1's policy logps (taken before the update) are identical.
    assert dpo["train_first"] == dpop["train_first"]
    assert dpo["train_last"]["step"] == dpop["train_last"]["step"] == 3
    recs = {n: [json.loads(x) for x in (out / n / "metrics.jsonl").read_text().splitlines()] for n in ("dpo", "dpop")}
    assert [r["step"] for r in recs["dpo"] if "loss" in r] == [1, 2, 3]


def test_start_scores_match_the_trainers_eval(compared):
    """Two code paths score the SFT start on the eval split: the trainer's final eval (chunked logps, batches of
    pairs, padding pairs dropped) and jsmaug.train.eval (rows sorted by length). They must agree."""
    out, summary, _ = compared
    sft_final = [json.loads(x) for x in (out / "start_sft" / "metrics.jsonl").read_text().splitlines()][-1]
    np.testing.assert_allclose(summary["start_eval"]["logps/chosen"], sft_final["eval/logps/chosen"], rtol=1e-4)
    np.testing.assert_allclose(summary["start_eval"]["logps/rejected"], sft_final["eval/logps/rejected"], rtol=1e-4)
    assert summary["eval_pairs"] == 44


def test_writes_figure_and_table(compared):
    out, summary, stdout = compared
    png = (out / "compare_losses.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert "chosen start" in stdout and "dpop" in stdout
    for name in ("dpo", "dpop"):
        s = summary["losses"][name]
        assert s["chosen_logps_change"] == pytest.approx(s["end_chosen_logps"] - s["start_chosen_logps"])


def test_a_losss_own_hyperparameters_reach_its_run_only():
    from jsmaug.cli import compare_losses

    assert compare_losses.parse_loss("simpo@beta=2.0@simpo_gamma=0.5") == (
        "simpo", ["loss.beta=2.0", "loss.simpo_gamma=0.5"])
    assert compare_losses.parse_loss("dpop") == ("dpop", [])
    # argparse hands everything after --losses to it: loss specs stay, key=value overrides move back.
    assert compare_losses.split_overrides(["dpo", "simpo@beta=2.0", "train.steps=3", "a.b=x@y"], ["seed=1"]) == (
        ["dpo", "simpo@beta=2.0"], ["train.steps=3", "a.b=x@y", "seed=1"])


def test_unknown_loss_is_an_error(tmp_path):
    r = _tool(["--losses", "dpo", "kto"], tmp_path)
    assert r.returncode == 2 and "unknown loss type 'kto'" in r.stderr
    r = _tool(["--losses", "simpo@beta"], tmp_path)
    assert r.returncode == 2 and "after '@' give key=value, got 'beta'" in r.stderr
