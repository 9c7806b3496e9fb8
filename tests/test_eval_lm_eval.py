"""jsmaug's generation and multiple-choice scoring against lm-evaluation-harness 0.4.13 itself: the few-shot
prompts its own task objects build (0 and k shots, plain and under a chat template, few-shot as turns or as one
message), and one in-process `simple_evaluate` with its HF model on a tiny random export, where every
completion, per-row score and figure must equal `jsmaug evaluate`'s."""

import json
import sys
import types
from pathlib import Path

import jax
import numpy as np
import pytest

from jsmaug import hf
from jsmaug.data import batches as data_lib, formats
from jsmaug.eval import gsm8k, multiple_choice
from jsmaug.models import config as config_lib, decoder as model

lm_eval = pytest.importorskip("lm_eval")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import compare_lm_eval  # noqa: E402
import make_gsm8k_like  # noqa: E402

K = 3


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny random Mixtral exported with Mixtral's tokenizer and its [INST] chat template, a GSM8K-layout test
    file (4 rows) and few-shot file (8 rows), and multiple-choice test / few-shot files."""
    root = tmp_path_factory.mktemp("lm_eval")
    cfg = config_lib.tiny(vocab_size=32000, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, num_local_experts=3,
                          max_position_embeddings=512)
    params = jax.jit(model.init_params, static_argnums=0)(cfg, jax.random.key(0))
    # Larger output weights: logits spread by several nats, so no greedy choice is a float32 near-tie.
    params = dict(params, lm_head=params["lm_head"] * 40.0)
    template = (ROOT / "configs" / "chat_templates" / "mixtral_instruct.jinja").read_text()
    hf.save(root / "export", cfg, params, dtype="float32", tokenizer_path=data_lib.Tokenizer().path,
            chat_template=template)
    rows = make_gsm8k_like.problems(12, seed=3)
    (root / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:4]))
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[4:]))
    mc = (ROOT / "data" / "sample" / "mc.jsonl").read_text().splitlines(keepends=True)
    (root / "mc.jsonl").write_text("".join(mc[:6]))
    (root / "mc_shots.jsonl").write_text("".join(mc[6:12]))
    return root


def _task(root: Path, name: str, yaml_text: str):
    """lm-eval's task object for a local task YAML, its few-shot seed set as `simple_evaluate` sets it."""
    from lm_eval.tasks import TaskManager, get_task_dict

    task_dir = root / f"task_{name}"
    task_dir.mkdir(exist_ok=True)
    (task_dir / f"{name}.yaml").write_text(yaml_text)
    task = get_task_dict([name], TaskManager(include_path=str(task_dir), include_defaults=False))[name]
    task.set_fewshot_seed(seed=1234)
    return task


def _hf_chat_template(folder: Path):
    """lm-eval's own `HFLM.apply_chat_template`, bound to transformers' tokenizer of the export."""
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoTokenizer

    lm = types.SimpleNamespace(tokenizer=AutoTokenizer.from_pretrained(folder), chat_template_args={})
    return lambda chat_history, add_generation_prompt=True: HFLM.apply_chat_template(
        lm, chat_history, add_generation_prompt)


@pytest.mark.parametrize("k, chat, multiturn", [(0, False, False), (K, False, False), (0, True, True),
                                                (K, True, True), (K, True, False)])
def test_gsm8k_prompts_equal_lm_eval_task_objects(files, k, chat, multiturn):
    task = _task(files, f"jsmaug_gsm8k_{k}", compare_lm_eval.gsm8k_task_yaml(
        files / "test.jsonl", files / "train.jsonl", k).replace(compare_lm_eval.GEN_TASK_NAME, f"jsmaug_gsm8k_{k}"))
    task.build_all_requests(apply_chat_template=chat, fewshot_as_multiturn=multiturn,
                            chat_template=_hf_chat_template(files / "export") if chat else None)
    theirs = [inst.arguments[0] for inst in sorted(task.instances, key=lambda i: i.doc_id)]
    tok = data_lib.Tokenizer(files / "export")
    ours = gsm8k.build_prompts(gsm8k.read_gsm8k(files / "test.jsonl"), num_fewshot=k,
                               fewshot_rows=gsm8k.read_gsm8k(files / "train.jsonl"),
                               chat_template=formats.load_chat_template("tokenizer", tok) if chat else None,
                               fewshot_as_multiturn=multiturn)
    assert ours == theirs
    assert ours[0].count("Question:") == k + 1 and (ours[0].startswith("<s>[INST]") == chat)
    if k:  # different rows draw different examples (the sampler is drawn from once per row)
        assert len({p.split(ours_question)[0] for p, ours_question in
                    zip(ours, [f"Question: {r['question']}" for r in gsm8k.read_gsm8k(files / "test.jsonl")])}) > 1


def test_multiple_choice_fewshot_contexts_equal_lm_eval(files):
    yaml_text = compare_lm_eval.MC_TASK.format(
        path=files / "mc.jsonl", k=K, fewshot=f"    train: {files / 'mc_shots.jsonl'}\nfewshot_split: train\n")
    task = _task(files, "jsmaug_mc", yaml_text)
    task.build_all_requests()
    theirs = sorted(task.instances, key=lambda i: (i.doc_id, i.idx))
    rows = multiple_choice.read_multiple_choice(files / "mc.jsonl")
    shots = multiple_choice.read_multiple_choice(files / "mc_shots.jsonl")
    contexts = multiple_choice.fewshot_contexts(rows, K, shots)
    pairs = [(ctx, " " + c) for row, ctx in zip(rows, contexts) for c in row["choices"]]
    assert [tuple(i.arguments) for i in theirs] == pairs
    assert contexts[0].count("\n\n") >= K


def test_generation_scores_equal_lm_eval_hf_model(files):
    """lm-eval's HF model (transformers, float32) against jsmaug's generation on the same export: every
    completion, every row's strict / flexible score, both figures and their standard errors; and the
    multiple-choice log-likelihoods with 3 shots."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    from jsmaug import eval as ev

    task_dir = files / "task_e2e"
    task_dir.mkdir(exist_ok=True)
    (task_dir / "jsmaug_gsm8k.yaml").write_text(compare_lm_eval.gsm8k_task_yaml(
        files / "test.jsonl", files / "train.jsonl", 2, max_gen_toks=12))
    (task_dir / "jsmaug_mc.yaml").write_text(compare_lm_eval.MC_TASK.format(
        path=files / "mc.jsonl", k=K, fewshot=f"    train: {files / 'mc_shots.jsonl'}\nfewshot_split: train\n"))
    manager = TaskManager(include_path=str(task_dir), include_defaults=False)
    out = simple_evaluate(model="hf", model_args=f"pretrained={files / 'export'},dtype=float32",
                          tasks=["jsmaug_gsm8k", "jsmaug_mc"], task_manager=manager,
                          batch_size=4, device="cpu", log_samples=True)
    tok = data_lib.Tokenizer(files / "export")
    config, params = ev.load_model(files / "export")
    ours = ev.gsm8k_eval(config, params, tok, ev.read_gsm8k(files / "test.jsonl"), num_fewshot=2,
                         fewshot_rows=ev.read_gsm8k(files / "train.jsonl"), max_new_tokens=12, batch_size=4,
                         progress=False)
    samples = out["samples"]["jsmaug_gsm8k"]
    first = {}
    for s in samples:
        first.setdefault(s["doc_id"], s)
    theirs = [first[i] for i in sorted(first)]
    assert compare_lm_eval.compare_generate(theirs, out["results"]["jsmaug_gsm8k"], ours) == []
    assert compare_lm_eval.per_row_scores(samples, ours) == []
    # The comparison sees a changed completion, prompt or figure.
    import copy

    changed = copy.deepcopy(ours)
    changed["rows"][1]["completion"] += " #### 1"
    changed["rows"][2]["prompt"] = changed["rows"][2]["prompt"].replace("\n\n", "\n", 1)
    changed["exact_match,flexible-extract"] += 0.25
    found = compare_lm_eval.compare_generate(theirs, out["results"]["jsmaug_gsm8k"], changed)
    assert [d.split(":")[0] for d in found] == ["row 1", "row 2", "exact_match,flexible-extract"]
    assert len(samples) == 2 * 4 and all(r["completion"] for r in ours["rows"])  # one sample per filter
    mc_rows = ev.read_multiple_choice(files / "mc.jsonl")
    mc = ev.multiple_choice_eval(config, params, tok, mc_rows, num_fewshot=K,
                                 fewshot_rows=ev.read_multiple_choice(files / "mc_shots.jsonl"), batch_size=8)
    mc_theirs = sorted(out["samples"]["jsmaug_mc"], key=lambda s: s["doc_id"])
    for t, o in zip(mc_theirs, mc["per_row"], strict=True):
        np.testing.assert_allclose([float(r[0][0]) for r in t["resps"]], o["lls"], atol=1e-4)
        assert (t["acc"], t["acc_norm"]) == (o["acc"], o["acc_norm"])
    assert out["results"]["jsmaug_mc"]["acc,none"] == pytest.approx(mc["acc"])


def test_lm_eval_results_go_into_the_card(files, tmp_path):
    """`jsmaug evaluate --card DIR --lm_eval_results FILE`: an lm-eval results JSON, in the layout
    `lm_eval --output_path` writes, is added to DIR/README.md, and huggingface_hub reads the figure back."""
    from huggingface_hub import ModelCard

    from jsmaug.cli import evaluate

    doc = {"results": {"jsmaug_gsm8k": {"alias": "jsmaug_gsm8k", "exact_match,strict-match": 0.25,
                                        "exact_match_stderr,strict-match": 0.25,
                                        "exact_match,flexible-extract": 0.5,
                                        "exact_match_stderr,flexible-extract": 0.2887}},
           "n-shot": {"jsmaug_gsm8k": 5}, "configs": {"jsmaug_gsm8k": {"task": "jsmaug_gsm8k"}}}
    path = tmp_path / "results.json"
    path.write_text(json.dumps(doc))
    card_dir = tmp_path / "model"
    card_dir.mkdir()
    assert evaluate.main(["--card", str(card_dir), "--lm_eval_results", str(path)]) == 0
    card = ModelCard.load(card_dir / "README.md")
    values = {(r.metric_type, r.metric_config): r.metric_value for r in card.data.eval_results}
    assert values[("exact_match", "flexible-extract")] == 0.5
    assert evaluate.main(["--card", str(tmp_path / "missing"), "--lm_eval_results", str(path)]) == 2
