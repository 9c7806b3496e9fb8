"""The model card (jsmaug/eval/card.py): huggingface_hub parses it, its eval_results hold the figures of the
results given (a jsmaug OUT.json; an lm-evaluation-harness results JSON made by lm-eval's own evaluator), merging
replaces, an export without results has a valid card, and a training run writes WORKDIR/hf/README.md."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cli_env import cli_env
from huggingface_hub import ModelCard

from jsmaug.errors import CheckpointError
from jsmaug.eval import card, card_results

ROOT = Path(__file__).resolve().parent.parent
HUB_ID = "tiny-org/tiny-mixtral"


def _figures(path):
    """{(task, dataset, shots, metric, metric config): value} as huggingface_hub reads the card."""
    parsed = ModelCard.load(path)
    out = {}
    for r in parsed.data.eval_results or []:
        key = (r.task_name, r.dataset_name, (r.dataset_args or {}).get("num_few_shot"), r.metric_type, r.metric_config)
        assert key not in out, f"{key} twice in the card"
        out[key] = r.metric_value
    return parsed, out


def _out_json(strict=0.25, flexible=0.5, shots=5):
    """An OUT.json of `jsmaug evaluate` (interface (A)): a generate, an mc and a preference file."""
    return {"model": "m", "reference": "ref", "results": {
        "generate:data/gsm_test.jsonl": {
            "task": "gsm8k", "num_fewshot": shots, "n": 4, "exact_match,strict-match": strict,
            "exact_match_stderr,strict-match": 0.25, "exact_match,flexible-extract": flexible,
            "exact_match_stderr,flexible-extract": 0.28, "rows": [{"prompt": "Question: 1+1?\nAnswer:"}]},
        "mc:data/arc_like.jsonl": {"rows": 3, "acc": 1 / 3, "acc_norm": 2 / 3, "num_fewshot": 25, "per_row": []},
        "preference:data/test.jsonl": {"pairs": 4, "logps/accuracy": 0.75, "rewards/accuracies": 0.5,
                                       "rewards/margins": 0.1, "per_pair": {}}}}


def _blank_card(folder):
    folder.mkdir(parents=True, exist_ok=True)
    return card.write_card(folder, base_model=HUB_ID, license="apache-2.0", family="mixtral", loss="dpop",
                           training={"loss": "dpop (beta=0.3, dpop_lambda=50)"}, datasets=["pairs.jsonl"])


def test_out_json_figures_land_in_the_card_and_merging_replaces(tmp_path):
    path = _blank_card(tmp_path / "m")
    parsed, figs = _figures(path)
    assert figs == {} and parsed.data.base_model == HUB_ID and parsed.data.tags == ["jsmaug", "dpop", "mixtral"]
    card.add_results(tmp_path / "m", _out_json())
    card.add_results(tmp_path / "m", _out_json())  # twice: replaced, not duplicated (_figures asserts it)
    parsed, figs = _figures(path)
    want = {("gsm8k", "gsm_test.jsonl", 5, "exact_match", "strict-match"): 0.25,
            ("gsm8k", "gsm_test.jsonl", 5, "exact_match", "flexible-extract"): 0.5,
            ("multiple_choice", "arc_like.jsonl", 25, "acc", None): 1 / 3,
            ("multiple_choice", "arc_like.jsonl", 25, "acc_norm", None): 2 / 3,
            ("preference_pairs", "test.jsonl", None, "rewards/accuracies", None): 0.5,
            ("preference_pairs", "test.jsonl", None, "logps/accuracy", None): 0.75}
    assert figs == want
    assert parsed.data.license == "apache-2.0" and parsed.data.library_name == "transformers"
    assert parsed.data.datasets == ["pairs.jsonl"]
    # A new figure for the same task, file, shots and metric replaces the old; another few-shot count of the same
    # file is a result of its own, with its own args (huggingface_hub's own grouping would give it the 5's).
    card.add_results(tmp_path / "m", _out_json(strict=0.75, flexible=1.0))
    card.add_results(tmp_path / "m", {"results": {"generate:data/gsm_test.jsonl": _out_json(
        strict=0.0, flexible=0.125, shots=0)["results"]["generate:data/gsm_test.jsonl"]}})
    _, figs = _figures(path)
    assert figs[("gsm8k", "gsm_test.jsonl", 5, "exact_match", "strict-match")] == 0.75
    assert figs[("gsm8k", "gsm_test.jsonl", 5, "exact_match", "flexible-extract")] == 1.0
    assert figs[("gsm8k", "gsm_test.jsonl", 0, "exact_match", "flexible-extract")] == 0.125
    assert len(figs) == 8
    text = path.read_text()
    assert text.count("| gsm8k | gsm_test.jsonl |") == 4 and "| 0.7500 |" in text  # the body's table follows
    assert text.count(card.RESULTS_START) == 1 and "## Training" in text


def test_cards_written_elsewhere_and_folders_without_one(tmp_path):
    """A card from elsewhere keeps its fields and text and gets the table appended; a folder without a card gets
    a minimal one (its family from config.json)."""
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "README.md").write_text("---\nlicense: mit\nlanguage: en\n---\n# Someone's model\n\nKeep me.\n")
    card.add_results(tmp_path / "a", _out_json())
    parsed, figs = _figures(tmp_path / "a" / "README.md")
    assert (parsed.data.license, parsed.data.language, len(figs)) == ("mit", "en", 6)
    assert "Keep me." in parsed.text and parsed.text.count(card.RESULTS_START) == 1
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
    parsed, figs = _figures(card.add_results(tmp_path / "b", _out_json()))
    assert parsed.data.tags == ["jsmaug", "qwen3"] and len(figs) == 6 and parsed.data.base_model is None
    assert "holds its results only" in parsed.text and "not fine-tuned" not in parsed.text
    with pytest.raises(CheckpointError, match="no such model folder"):
        card.add_results(tmp_path / "c", _out_json())


def test_lm_eval_results_from_lm_eval_itself(tmp_path, monkeypatch):
    """lm-eval 0.4.13's simple_evaluate over two local tasks (its gsm8k and arc_easy YAMLs on local files), with a
    model whose answers are fixed, so the figures are known: its results JSON lands with lm-eval's metric names
    and few-shot counts."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import lm_eval
    from lm_eval.api.model import LM
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import handle_non_serializable

    gsm = [{"question": f"What is {i} plus {i}?", "answer": f"{i} plus {i} is {2 * i}.\n#### {2 * i}"}
           for i in range(6)]
    (tmp_path / "gsm.jsonl").write_text("".join(json.dumps(r) + "\n" for r in gsm))
    keys = ["A", "A", "A", "C"]
    mc = [{"question": f"Q{i}?", "choices": {"text": ["yes", "no", "maybe"], "label": ["A", "B", "C"]},
           "answerKey": k} for i, k in enumerate(keys)]
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mc))
    tasks, installed = tmp_path / "tasks", Path(lm_eval.__file__).parent / "tasks"
    tasks.mkdir()
    for name, include, file, shots in (("local_gsm8k", "gsm8k/gsm8k.yaml", "gsm.jsonl", 5),
                                       ("local_arc", "arc/arc_easy.yaml", "mc.jsonl", 2)):
        (tasks / f"{name}.yaml").write_text(
            f"include: {installed / include}\ntask: {name}\ndataset_path: json\ndataset_name: null\n"
            f"num_fewshot: {shots}\ndataset_kwargs:\n  cache_dir: {tmp_path / 'cache'}\n  data_files:\n"
            + "".join(f"    {s}: {tmp_path / file}\n" for s in ("train", "validation", "test")))

    class Fixed(LM):  # "#### 4" for every question (right for i = 2 only); "yes" most likely, "maybe" per byte
        def loglikelihood(self, requests, disable_tqdm=False):
            return [({"yes": -1.0, "no": -2.0, "maybe": -1.2}[r.arguments[1].strip()], False) for r in requests]

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            raise NotImplementedError

        def generate_until(self, requests, disable_tqdm=False):
            return [" 2 plus 2 is 4.\n#### 4" for _ in requests]

    res = lm_eval.simple_evaluate(model=Fixed(), tasks=["local_gsm8k", "local_arc"], log_samples=False,
                                  task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
                                  bootstrap_iters=10)
    doc = json.loads(json.dumps(res, default=handle_non_serializable))  # what lm_eval --output_path writes
    r = doc["results"]
    # The fixture's figures, by hand: one GSM8K answer in 6 is 4; acc takes "yes" (A: 3 of 4), acc_norm takes
    # "maybe" (-1.2 / 6 bytes > -1 / 4; C: 1 of 4).
    assert r["local_gsm8k"]["exact_match,strict-match"] == pytest.approx(1 / 6)
    assert (r["local_arc"]["acc,none"], r["local_arc"]["acc_norm,none"]) == (0.75, 0.25)
    assert doc["n-shot"] == {"local_arc": 2, "local_gsm8k": 5}
    _blank_card(tmp_path / "m")
    path = card.add_results(tmp_path / "m", doc)
    parsed, figs = _figures(path)
    assert figs == {("local_gsm8k", "gsm.jsonl", 5, "exact_match", "strict-match"):
                    r["local_gsm8k"]["exact_match,strict-match"],
                    ("local_gsm8k", "gsm.jsonl", 5, "exact_match", "flexible-extract"):
                    r["local_gsm8k"]["exact_match,flexible-extract"],
                    ("local_arc", "mc.jsonl", 2, "acc", None): 0.75,
                    ("local_arc", "mc.jsonl", 2, "acc_norm", None): 0.25}
    for res in parsed.data.eval_results:
        assert res.dataset_split == "test" and res.source_url == card_results.LM_EVAL_URL
        assert res.source_name == f"lm-evaluation-harness {doc['lm_eval_version']}"
    card.add_results(tmp_path / "m", doc)
    assert _figures(path)[1] == figs


def test_hub_id_of_a_folder(tmp_path, monkeypatch):
    """A Hub-cache path, else config.json's _name_or_path when it is an id and not a path that exists."""
    snap = tmp_path / "models--Org--Name-1.5B" / "snapshots" / "abc"
    snap.mkdir(parents=True)
    assert card.hub_id_of_folder(snap) == "Org/Name-1.5B"
    monkeypatch.chdir(tmp_path)
    for name, want in (("meta-llama/Llama-3.2-1B", "meta-llama/Llama-3.2-1B"), ("gpt2", "gpt2"),
                       ("/abs/path/model", None), ("./model", None), ("models--Org--Name-1.5B", None), ("", None)):
        (tmp_path / "config.json").write_text(json.dumps({"_name_or_path": name}))
        assert card.hub_id_of_folder(tmp_path) == want, name


# ------------------------------------------------------------------------------------------------ exports and runs

@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A tiny random Mixtral (jsmaug's own init, written by jsmaug.hf.save: no torch) in the Hub cache's layout,
    with a README naming its license, converted by the CLI."""
    import jax

    from jsmaug import hf
    from jsmaug.cli import convert
    from jsmaug.models import decoder
    from jsmaug.models.config import preset

    root = tmp_path_factory.mktemp("card")
    hf_dir = root / "hub" / f"models--{HUB_ID.replace('/', '--')}" / "snapshots" / "0123abcd"
    config = preset("tiny", vocab_size=32000, hidden_size=32, intermediate_size=32, max_position_embeddings=512,
                    router_aux_loss_coef=0.02)
    hf.save(hf_dir, config, decoder.init_params(config, jax.random.key(5)))
    (hf_dir / "README.md").write_text("---\nlicense: apache-2.0\nlibrary_name: transformers\n---\n# tiny\n")
    assert convert.main(["--hf_dir", str(hf_dir), "--out_dir", str(root / "ckpt")]) == 0
    return root


def test_export_without_results_has_a_valid_card(converted, tmp_path):
    from jsmaug.cli import export

    source = json.loads((converted / "ckpt" / card.SOURCE_FILE).read_text())
    assert source["base_model"] == HUB_ID and source["license"] == "apache-2.0"
    assert export.main(["--ckpt_dir", str(converted / "ckpt"), "--out_dir", str(tmp_path / "x"), "--no_tokenizer"]) == 0
    parsed = ModelCard.load(tmp_path / "x" / "README.md")
    assert parsed.data.base_model == HUB_ID and parsed.data.license == "apache-2.0"
    assert parsed.data.tags == ["jsmaug", "mixtral"] and not parsed.data.eval_results
    assert "not fine-tuned" in parsed.text
    # Given names win over what the checkpoint knows (the license of a known base stays the base's).
    assert export.main(["--ckpt_dir", str(converted / "ckpt"), "--out_dir", str(tmp_path / "y"), "--no_tokenizer",
                        "--base_model", "other/base", "--dataset", "my/pairs", "--license", "mit"]) == 0
    parsed = ModelCard.load(tmp_path / "y" / "README.md")
    assert (parsed.data.base_model, parsed.data.datasets, parsed.data.license) == ("other/base", ["my/pairs"],
                                                                                  "apache-2.0")
    # A base_model that is not a Hub id is refused before anything is written.
    assert export.main(["--ckpt_dir", str(converted / "ckpt"), "--out_dir", str(tmp_path / "z"), "--no_tokenizer",
                        "--base_model", "./my/local"]) == 2
    assert not (tmp_path / "z").exists()


def test_a_run_writes_its_card_and_export_carries_its_results(converted, tmp_path):
    rows = [{"prompt": f"Q{i}: {i} plus {i}?", "chosen": f" {2 * i}", "rejected": f" {2 * i + 1}"} for i in range(8)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    wd = tmp_path / "run"
    r = subprocess.run(
        [sys.executable, "-m", "jsmaug.train", "configs/tiny_dpop.yaml", f"init_from={converted / 'ckpt'}",
         f"workdir={wd}", f"data.train_path={tmp_path / 'pairs.jsonl'}", f"data.eval_path={tmp_path / 'pairs.jsonl'}",
         "data.max_length=32", "data.max_prompt_length=16", "train.batch_size=4", "train.steps=2",
         "train.learning_rate=0.001", "train.warmup_steps=0", "train.schedule=constant", "log.every=1",
         "log.tensorboard=false", "checkpoint.every=2", "loss.beta=0.2"],
        cwd=ROOT, env=cli_env(1), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    path = wd / "hf" / "README.md"
    parsed, figs = _figures(path)
    assert parsed.data.base_model == HUB_ID and parsed.data.license == "apache-2.0"
    assert parsed.data.tags == ["jsmaug", "dpop", "mixtral"] and parsed.data.datasets == ["pairs.jsonl"]
    final = [json.loads(ln) for ln in (wd / "metrics.jsonl").read_text().splitlines()][-1]
    assert final["step"] == 2
    assert figs == {("preference_pairs", "pairs.jsonl", None, "rewards/accuracies", None):
                    final["eval/rewards/accuracies"]}
    text = path.read_text()
    for row in ("| loss | dpop (beta=0.2, dpop_lambda=50) |", "| steps | 2 of 2 |", "| learning rate | 0.001, constant "
                "schedule |", "| batch | 4 pairs per step |", "# run"):
        assert row in text, row
    # Results added to the run's hf/ go with an export of its final step.
    from jsmaug.cli import export

    card.add_results(wd / "hf", _out_json())
    assert export.main(["--ckpt_dir", str(wd), "--out_dir", str(tmp_path / "x"), "--no_tokenizer"]) == 0
    _, exported = _figures(tmp_path / "x" / "README.md")
    assert exported == _figures(path)[1] and len(exported) == 7
    assert os.listdir(tmp_path / "x").count("README.md") == 1
