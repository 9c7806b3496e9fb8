"""tools/compare_losses.py end to end on a tiny config: SFT warm-up, then DPOP and SFT on identical batches, scored
on held-out pairs, by generation on GSM8K-layout problems (--generate) and on multiple choice (--mc).

Kept cheap for CI (one compare-losses process for the whole module): two loss runs, not three (a DPO run would add
a train-step compile and no assertion needs a third arm: two runs of different losses are enough to show a shared
start and shared batches, and the `sft` run also checks that `--losses sft` gets its own run beside the SFT
warm-up); and `moe_impl=dense`, the reference MoE path, whose train step compiled in 2.8 s against the bucketed
default's 7.2 s (one DPOP step of this config, XLA -O0, 2-core CPU; this file tests the tool's plumbing, and
test_moe tests the MoE paths against each other). The argument errors are checked by calling `main` in-process: no JAX process to start."""

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
         "log.tensorboard=false", "log.eval_every=0", "data.eval_path=data/sample/test.jsonl", "model.moe_impl=dense"]


def _tool(args, out):
    return subprocess.run([sys.executable, "tools/compare_losses.py", "--out", str(out), *args], cwd=ROOT, env=cli_env(),
                          capture_output=True, text=True, timeout=900)


GEN = ["--max_new_tokens", "6", "--gen_batch_size", "4", "--mc", "data/sample/mc.jsonl", "--no_trainer_eval"]


def _gsm8k_like(path, n=5, seed=7):
    subprocess.run([sys.executable, "tools/make_gsm8k_like.py", "--n", str(n), "--seed", str(seed), "--out", str(path)],
                   cwd=ROOT, check=True, capture_output=True)
    return path


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    test = _gsm8k_like(out / "gsm_test.jsonl")
    r = _tool(["--sft_steps", "2", "--steps", "3", "--losses", "dpop", "sft", "--generate", str(test), *GEN,
               *SMALL], out)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out, json.loads((out / "summary.json").read_text()), r.stdout


def test_runs_share_start_and_batches(compared):
    out, summary, _ = compared
    dpop, sft = summary["losses"]["dpop"], summary["losses"]["sft"]
    assert dpop["start_chosen_logps"] == sft["start_chosen_logps"]
    # Same start, same first batch: step 1's policy logps (taken before the update) are identical, whatever the loss.
    assert dpop["train_first"] == sft["train_first"]
    assert dpop["train_last"]["step"] == sft["train_last"]["step"] == 3
    recs = {n: [json.loads(x) for x in (out / n / "metrics.jsonl").read_text().splitlines()] for n in ("dpop", "sft")}
    assert [r["step"] for r in recs["dpop"] if "loss" in r] == [1, 2, 3]
    # --no_trainer_eval: the loss runs leave the eval split to compare-losses (the SFT warm-up still evaluates).
    assert not any("eval/loss" in r for n in ("dpop", "sft") for r in recs[n])


def test_start_scores_match_the_trainers_eval(compared):
    """Two code paths score the SFT start on the eval split: the trainer's final eval (chunked logps, batches of
    pairs, padding pairs dropped) and jsmaug.eval (rows sorted by length). They must agree."""
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
    assert "exact_match_strict" in stdout and "CPU" in stdout and summary["cpu_seconds"] > 0
    for name in ("dpop", "sft"):
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


def _main(args, out, capsys):
    """compare-losses in this process (for runs that stop at an argument error, before any JAX work): its exit
    status and stderr."""
    from jsmaug.cli import compare_losses

    capsys.readouterr()
    rc = compare_losses.main(["--out", str(out), *args])
    return rc, capsys.readouterr().err


def test_unknown_loss_is_an_error(tmp_path, capsys):
    rc, err = _main(["--losses", "dpo", "kto"], tmp_path, capsys)
    assert rc == 2 and "unknown loss type 'kto'" in err
    rc, err = _main(["--losses", "simpo@beta"], tmp_path, capsys)
    assert rc == 2 and "after '@' give key=value, got 'beta'" in err


def _lm_eval_scores(completions, answers):
    """lm-evaluation-harness 0.4.13's own gsm8k filters and metric (lm_eval/tasks/gsm8k/gsm8k.yaml) on the
    completions: strict-match, flexible-extract, exact_match with its regexes_to_ignore, per row."""
    from lm_eval.api.metrics import exact_match_hf_evaluate
    from lm_eval.filters.extraction import RegexFilter

    ignore = [",", "\\$", "(?s).*#### ", "\\.$"]
    out = {}
    for name, filt in (("strict-match", RegexFilter(r"#### (\-?[0-9\.\,]+)", 0)),
                       ("flexible-extract", RegexFilter(r"(-?[$0-9.,]{2,})|(-?[0-9]+)", -1))):
        preds = [r[0] for r in filt.apply([[c] for c in completions], [{}] * len(completions))]
        out[name] = [exact_match_hf_evaluate([p], [a], regexes_to_ignore=ignore, ignore_case=True)["exact_match"]
                     for p, a in zip(preds, answers)]
    return out


def test_downstream_columns_are_the_written_rows(compared):
    """Every model's exact match is lm-eval's filters and metric applied to its written completions, the prompts
    are lm-eval's 0-shot gsm8k text, and the summary's start/end columns are those files' figures."""
    out, summary, _ = compared
    test = [json.loads(x) for x in (out / "gsm_test.jsonl").read_text().splitlines()]
    assert summary["generate"]["n"] == len(test) == 5 and summary["mc"]["n"] == 20
    for name in ("start", "dpop", "sft"):
        scores = json.loads((out / "scores" / f"{name}.json").read_text())["scores"]
        rows = scores["generate"]["rows"]
        assert [r["prompt"] for r in rows] == [f"Question: {t['question']}\nAnswer:" for t in test]
        want = _lm_eval_scores([r["completion"] for r in rows], [t["answer"] for t in test])
        for key in ("strict-match", "flexible-extract"):
            assert [r[f"exact_match,{key}"] for r in rows] == want[key]
            assert scores["generate"][f"exact_match,{key}"] == pytest.approx(np.mean(want[key]))
        mc = scores["mc"]
        assert mc["acc"] == pytest.approx(np.mean([r["acc"] for r in mc["per_row"]]))
        cols = summary["start_downstream"] if name == "start" else {
            k[4:]: v for k, v in summary["losses"][name].items() if k.startswith("end_")}
        assert cols["exact_match_strict"] == scores["generate"]["exact_match,strict-match"]
        assert cols["exact_match_flexible"] == scores["generate"]["exact_match,flexible-extract"]
        assert (cols["mc_acc"], cols["mc_acc_norm"]) == (mc["acc"], mc["acc_norm"])
    for name in ("dpop", "sft"):
        assert summary["losses"][name]["start_mc_acc"] == summary["start_downstream"]["mc_acc"]


def test_end_scores_equal_jsmaug_evaluate_on_the_final_policy(compared, tmp_path):
    """`jsmaug evaluate` loads the DPOP workdir by itself: its completions, exact match and multiple-choice
    accuracy equal the ones compare-losses wrote for that policy (so the end policy, not the start, was scored)."""
    out, summary, _ = compared
    res = tmp_path / "eval.json"
    r = subprocess.run([sys.executable, "-m", "jsmaug.cli.main", "evaluate", "--model", str(out / "dpop"),
                        "--generate", str(out / "gsm_test.jsonl"), "--mc", "data/sample/mc.jsonl", "--max_new_tokens",
                        "6", "--batch_size", "4", "--no_progress", "--out", str(res)],
                       cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    results = json.loads(res.read_text())["results"]
    gen = next(v for k, v in results.items() if k.startswith("generate:"))
    mc = next(v for k, v in results.items() if k.startswith("mc:"))
    ours = json.loads((out / "scores" / "dpop.json").read_text())["scores"]
    assert [x["completion"] for x in gen["rows"]] == [x["completion"] for x in ours["generate"]["rows"]]
    start = json.loads((out / "scores" / "start.json").read_text())["scores"]
    assert ([x["completion"] for x in start["generate"]["rows"]] != [x["completion"] for x in gen["rows"]]
            or start["mc"]["per_row"] != ours["mc"]["per_row"]), "the DPOP policy scored like the start"
    end = summary["losses"]["dpop"]
    assert end["end_exact_match_flexible"] == gen["exact_match,flexible-extract"]
    assert end["end_exact_match_strict"] == gen["exact_match,strict-match"]
    assert (end["end_mc_acc"], end["end_mc_acc_norm"]) == pytest.approx((mc["acc"], mc["acc_norm"]))


def test_a_held_out_question_seen_in_training_is_an_error(tmp_path, capsys, monkeypatch):
    """Checked before any training: a --generate problem whose question is in a training pair."""
    monkeypatch.chdir(ROOT)  # the default config and its data paths are relative to the checkout
    test = _gsm8k_like(tmp_path / "test.jsonl", n=3, seed=3)
    leaked = json.loads(test.read_text().splitlines()[1])
    train = tmp_path / "train.jsonl"
    train.write_text(Path(ROOT / "data/sample/train.jsonl").read_text() + json.dumps(
        {"prompt": f"Question: {leaked['question']}\nAnswer:", "chosen": " 1", "rejected": " 2"}) + "\n")
    rc, err = _main(["--generate", str(test), f"data.train_path={train}"], tmp_path / "out", capsys)
    assert rc == 2, err[-2000:]
    assert f"--generate: {test}:line 2: its question is in the training data ({train}:line 337)" in err
    assert not (tmp_path / "out").exists()
    rc, err = _main(["--generate", str(test), "--num_fewshot", "2"], tmp_path / "out", capsys)
    assert rc == 2 and "--num_fewshot > 0 needs --fewshot_file" in err


def test_reference_computed_once_equals_preference_eval_with_reference(compared):
    """compare-losses scores the start once and derives every policy's rewards from it (`with_reference`): the same
    figures as `preference_eval` with the start as the reference, and the summary holds them."""
    from jsmaug.cli import compare_losses
    from jsmaug.data import batches as data_lib, tokenizer_folder
    from jsmaug import eval as eval_lib
    from jsmaug.train import checkpoint

    out, summary, _ = compared
    tok = data_lib.Tokenizer(tokenizer_folder.run_tokenizer_path(None, str(out / "start_sft")))
    examples, _ = data_lib.prepare("data/sample/test.jsonl", data_lib.DataConfig(max_length=64, max_prompt_length=32),
                                   tok)
    config, start = checkpoint.load_params(out / "start_sft")
    _, policy = checkpoint.load_params(out / "dpop")
    want = eval_lib.preference_eval(config, policy, examples, start, beta=0.3)
    got = compare_losses.with_reference(eval_lib.preference_eval(config, policy, examples),
                                        eval_lib.preference_eval(config, start, examples), 0.3)
    for key, value in want.items():
        if key != "per_pair":
            assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    s = summary["losses"]["dpop"]
    assert s["eval_reward_accuracy"] == pytest.approx(want["rewards/accuracies"])
    assert s["eval_fraction_chosen_decreased"] == pytest.approx(want["chosen_logps_decreased"])
    assert s["end_chosen_logps"] == pytest.approx(want["logps/chosen"], rel=1e-5)
