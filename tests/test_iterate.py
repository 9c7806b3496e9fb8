"""`jsmaug iterate` on a tiny random model: two rounds of a few steps; a run stopped in the middle of round 2 (a
SIGTERM, as a scheduler sends it) and run again ends with the same policy, bit for bit, as a run never stopped;
round 2 samples with round 1's policy. The two-round test is `slow` (JSMAUG_SLOW=1); bad inputs are refused
before any work in the default run."""

import json
import textwrap

import numpy as np
import pytest

import jax

from jsmaug import eval as ev
from jsmaug.data import formats
from jsmaug.data.tokenizer import Tokenizer
from jsmaug.models import config as config_lib, decoder as model
from jsmaug.train import checkpoint, iterate


@pytest.fixture(scope="module")
def common(tmp_path_factory):
    d = tmp_path_factory.mktemp("iterate")
    cfg = config_lib.tiny(vocab_size=32000, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, num_local_experts=3)
    checkpoint.save_params(d / "start", cfg, jax.jit(model.init_params, static_argnums=0)(cfg, jax.random.key(0)))
    (d / "check.py").write_text(textwrap.dedent("""\
        def even(problem, completion):
            return len(completion) % 2 == 0
        """))
    with open(d / "problems.jsonl", "w") as fh:
        for i in range(6):
            fh.write(json.dumps({"prompt": f"Q: {i}+{i}="}) + "\n")
    with open(d / "heldout.jsonl", "w") as fh:
        for i in range(2):
            fh.write(json.dumps({"question": f"{i}+1?", "answer": f"#### {i + 1}"}) + "\n")
    args = ["tiny_dpop", "--problems", str(d / "problems.jsonl"), "--heldout", str(d / "heldout.jsonl"),
            "--init_from", str(d / "start"), "--k", "4", "--max_new_tokens", "6", "--temperature", "1.0",
            "--top_p", "1", "--verifier", f"{d / 'check.py'}:even", "--pairs_per_problem", "2",
            "--heldout_max_new_tokens", "4", "--heldout_batch_size", "2", "--quiet",
            "train.steps=4", "train.batch_size=8", "train.warmup_steps=0", "checkpoint.every=2", "log.every=1",
            "log.tensorboard=false", "checkpoint.async_save=false"]
    return d, args


@pytest.mark.slow
def test_two_rounds_resume_in_round_two_gives_the_same_policy(common, capsys):
    """About 5 minutes of wall time on the shared, loaded 2-core machine (cold compile cache): four iterate runs,
    each training, exporting, sampling and scoring held-out problems."""
    d, args = common
    full, stopped = d / "full", d / "stopped"
    assert iterate.main(args + ["--rounds", "2", "--out", str(full)]) == 0
    lines = capsys.readouterr().out.splitlines()
    head = next(i for i, x in enumerate(lines) if x.startswith("round | correct | pairs"))
    assert [x.split(" | ")[0] for x in lines[head + 2:]] == ["0", "1", "2"]

    assert iterate.main(args + ["--rounds", "1", "--out", str(stopped)]) == 0
    assert iterate.main(args + ["--rounds", "2", "--out", str(stopped), "debug.sigterm_at_step=3"]) == 143
    train2 = stopped / "round_2" / "train"
    assert (train2 / "checkpoints" / "3").is_dir() and not (train2 / "done.json").exists()
    assert (stopped / "round_2" / "pairs.jsonl").read_bytes() == (full / "round_2" / "pairs.jsonl").read_bytes()
    capsys.readouterr()
    assert iterate.main(args + ["--rounds", "2", "--out", str(stopped)]) == 0
    resumed = capsys.readouterr()
    assert "at step 3" in resumed.out + resumed.err

    _, a = ev.load_model(full / "round_2" / "train")
    _, b = ev.load_model(train2)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    _, start = ev.load_model(d / "start")
    assert any(not np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a),
                                                                                 jax.tree.leaves(start)))

    rows = json.loads((full / "summary.json").read_text())
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert rows[2]["start"] == str(full / "round_1" / "train") and rows[2]["model"] == str(full / "round_2" / "train")
    for r in rows:
        assert 0.0 <= r["heldout_flexible"] <= 1.0
    for r in rows[1:]:
        assert r["pairs"] > 0 and 0 < r["share_correct"] < 1 and np.isfinite(r["logps/chosen"])
    # Wall and CPU seconds (`seconds`, `cpu_*`) and the paths differ between the two runs; every score does not.
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("seconds", "start", "model")  # noqa: E731
                         and not k.startswith("cpu_")} for r in rs]
    assert strip(rows) == strip(json.loads((stopped / "summary.json").read_text()))
    assert (full / "iterate.png").read_bytes()[:4] == b"\x89PNG"

    # Round 2 sampled with round 1's trained policy: its kept reference log-probs are that policy's, not the start's.
    tok = Tokenizer()
    cfg1, p1 = ev.load_model(full / "round_1" / "train")
    _, p0 = ev.load_model(d / "start")
    row = json.loads((full / "round_2" / "pairs.jsonl").read_text().splitlines()[0])
    ids = formats.row_ids("pairs", row, formats.STANDARD, ("prompt", "chosen", "rejected"), tok, None)
    got1, _ = ev.completion_logps(cfg1, p1, [(ids[0], ids[1]), (ids[0], ids[2])], batch_size=2)
    got0, _ = ev.completion_logps(cfg1, p0, [(ids[0], ids[1]), (ids[0], ids[2])], batch_size=2)
    np.testing.assert_allclose(got1, [row["ref_chosen_logps"], row["ref_rejected_logps"]], atol=1e-4)
    assert abs(got0[0] - row["ref_chosen_logps"]) > 1e-3


def test_bad_inputs_are_refused_before_work(common, tmp_path, capsys):
    d, args = common
    no_start = [a for a in args if a not in ("--init_from", str(d / "start"))]
    assert iterate.main(no_start + ["--rounds", "1", "--out", str(tmp_path / "x")]) == 2
    assert "give --init_from" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "answer": "no final answer"}) + "\n")
    i = args.index("--heldout")
    assert iterate.main(args[:i + 1] + [str(bad)] + args[i + 2:] + ["--rounds", "1", "--out", str(tmp_path / "y")]) == 2
    assert "bad.jsonl:line 1" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()


def test_table_and_figure(tmp_path):
    rows = [{"round": 0, "heldout_strict": 0.1, "heldout_flexible": 0.25},
            {"round": 1, "share_correct": 0.375, "pairs": 12, "no_correct": 3, "no_wrong": 1, "logps/chosen": -41.25,
             "logps/rejected": -52.5, "heldout_strict": 0.2, "heldout_flexible": 0.3, "cpu_s": 812.4}]
    assert iterate.table(rows).splitlines()[2:] == ["0 | - | - | - | - | - | - | 0.100 | 0.250 | -",
                                                    "1 | 0.375 | 12 | 3 | 1 | -41.25 | -52.50 | 0.200 | 0.300 | 812"]
    iterate.plot(rows, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_a_rounds_cost_is_the_sum_of_its_stages():
    row = {"cpu_heldout": 30.5}
    iterate._round_cost(row, sample={"cpu_s": 100.25, "wall_s": 300.0}, train={"cpu_s": 50.0})
    assert (row["cpu_sample"], row["cpu_train"], row["cpu_s"]) == (100.25, 50.0, 180.75)
    row = {}
    iterate._round_cost(row, sample=None)
    assert row["cpu_s"] is None
