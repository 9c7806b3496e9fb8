"""Who writes what: a process other than 0 writes nothing; process 0 writes each file whole.

A run in a bucket is not tested here: neither GCS emulator installable offline held up (see docs/pods.md,
"A workdir every host sees"); the paths go through `etils.epath`, whose local backend these tests use."""

import json

import numpy as np

from jsmaug.train.outputs import RunOutputs


def test_only_the_writer_writes(tmp_path):
    quiet = RunOutputs(tmp_path / "run", writer=False)
    quiet.check_writable()  # every process checks that it can write its checkpoint shards
    quiet.write_config({"a": 1})
    m = quiet.metrics(0, tensorboard=True)
    m.write(1, {"loss": 1.0})
    m.close()
    quiet.save_ref_cache(quiet.ref_cache_path("x"), np.zeros((2, 2), np.float32))
    assert list((tmp_path / "run").iterdir()) == []
    loud = RunOutputs(tmp_path / "run", writer=True)
    loud.write_config({"a": 1})
    m = loud.metrics(0, tensorboard=False)
    m.write(1, {"loss": 1.0})
    assert m.logged(1, "loss") and not m.logged(1, "eval/loss")
    m.close()
    assert json.loads((tmp_path / "run" / "config.json").read_text()) == {"a": 1}
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == '{"step": 1, "loss": 1.0}\n'


def test_run_card_inputs_read_the_run_and_follow_init_from(tmp_path):
    """The card's training table from config.json (defaults filled in) and metrics.jsonl, and the base model
    followed back through a run started from a run started from a converter checkpoint."""
    from jsmaug.eval import card
    from jsmaug.train.outputs import run_card_inputs

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / card.SOURCE_FILE).write_text(json.dumps({"hf_dir": "/models/x", "base_model": "org/x",
                                                     "license": "other", "license_name": "x-license"}))
    first, second = tmp_path / "sft", tmp_path / "dpo"
    for wd, start in ((first, str(ckpt)), (second, str(first))):
        (wd / "checkpoints").mkdir(parents=True)
        (wd / "config.json").write_text(json.dumps({"init_from": start, "data": {"train_path": "d/pairs.jsonl"}}))
    raw = {"init_from": str(first), "seed": 3,
           "data": {"train_path": ["d/a.jsonl", "d/b.parquet"], "eval_path": "d/test.jsonl", "max_length": 64},
           "train": {"steps": 3, "batch_size": 4, "micro_batches": 2, "learning_rate": 1e-3, "warmup_steps": 1},
           "loss": {"type": ["dpo", "sft"], "weights": [1.0, 0.5], "beta": 0.1}}
    (second / "config.json").write_text(json.dumps(raw))
    recs = [{"step": s, "loss": 0.7 - 0.1 * s, "tokens": 100.0 + s, "rewards/accuracies": 0.5} for s in (1, 2, 3)]
    recs.append({"step": 3, "eval/loss": 0.4, "eval/rewards/accuracies": 0.625})
    (second / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    info = run_card_inputs(second)
    t = info["training"]
    assert t["tokens seen"] == "306 (non-padding)" and t["steps"] == "3 of 3"
    assert t["batch"] == "4 pairs per step (2 micro-batches)" and t["sequence length"] == "64 (prompt 128)"
    # The defaults the run took (jsmaug.train.config): cosine to 0 x, AdamW's b2 0.95, clip 1.
    assert t["learning rate"] == "0.001, cosine schedule, 1 warm-up steps, to 0 x"
    assert t["optimizer"].startswith("AdamW (b1 0.9, b2 0.95") and t["optimizer"].endswith("clip 1")
    # `dpo` is TRL's sigmoid loss: the hyper-parameters it takes, with each term's weight.
    assert t["loss"].startswith("1 x dpo (beta=0.1, label_smoothing=0") and " + 0.5 x sft" in t["loss"]
    assert info["loss"] == "dpo+sft" and info["datasets"] == ["a.jsonl", "b.parquet"]
    assert [(r.metric_type, r.metric_value, r.dataset_name) for r in info["results"]] == [
        ("rewards/accuracies", 0.625, "test.jsonl")]
    base = info["base"]
    assert base.base_model == "org/x" and base.license == {"license": "other", "license_name": "x-license"}
    assert base.chain == [str(first), str(ckpt), "/models/x"]
    # Without `tokens` in metrics.jsonl (runs before it was logged) the card says so rather than guess.
    (second / "metrics.jsonl").write_text("".join(json.dumps({k: v for k, v in r.items() if k != "tokens"}) + "\n"
                                                  for r in recs))
    assert run_card_inputs(second)["training"]["tokens seen"] == "not recorded in metrics.jsonl"
    # `train.learning_rate=1e-5` on a command line: YAML 1.1 reads it as a string, config.json keeps the string,
    # and the card reads it as the run did (a number).
    raw["train"]["learning_rate"] = "1e-5"
    (second / "config.json").write_text(json.dumps(raw))
    assert run_card_inputs(second)["training"]["learning rate"].startswith("1e-05, cosine")
