"""Evaluation: multiple-choice acc / acc_norm and preference metrics against hand computations; the CLI."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

import jax

from jsmaug.data import batches as data_lib

from jsmaug.models import config as config_lib

from jsmaug.train import checkpoint
from jsmaug import eval as eval_lib
from jsmaug.models import decoder as model

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))


@pytest.fixture(scope="module")
def setup():
    cfg = config_lib.tiny(vocab_size=32000, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, num_local_experts=3)
    params = jax.jit(model.init_params, static_argnums=0)(cfg, jax.random.key(0))
    # Larger embeddings so the random model has opinions (log-likelihoods spread by a few nats).
    params = dict(params, lm_head=params["lm_head"] * 40.0)
    return cfg, params, data_lib.Tokenizer()


_forward = jax.jit(model.forward, static_argnums=0)


def _hand_ll(cfg, params, ctx, cont):
    """log p(cont | ctx) from the plain forward's full logits (one row, numpy log-softmax). The row is right-
    padded to 96 tokens (one compile); causal attention makes the padding invisible to earlier positions."""
    seq = list(ctx) + list(cont)
    ids = np.zeros((1, 96), np.int32)
    ids[0, :len(seq)] = seq
    logits = np.asarray(_forward(cfg, params, ids)[0][0], np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    return sum(logp[len(ctx) - 1 + i, t] for i, t in enumerate(cont))


MC_ROWS = [
    {"query": "Question: Which planet is closest to the Sun?\nAnswer:",
     "choices": ["Mercury", "the planet Venus, second from the Sun", "Mars"], "gold": 0},
    {"query": "Question: What is frozen water called?\nAnswer: ",  # trailing space moves to the continuation
     "choices": ["ice", "steam and hot fog", "dew"], "gold": 2},
    {"query": "Q: colour of the sky?\nA:", "choices": ["blue", "green", "a very long answer about clouds"],
     "gold": 1},
    {"question": "Pick one:", "choices": ["x", "yy"], "label": 1},
]


def test_encode_pair_moves_trailing_space(setup):
    _, _, tok = setup
    ctx, cont = eval_lib.encode_pair(tok, "Answer: ", " ice")
    assert ctx == [tok.bos_id] + tok.encode("Answer:")
    assert ctx[1:] + cont == tok.encode("Answer:  ice")


def test_multiple_choice_matches_hand_computation(setup, tmp_path):
    cfg, params, tok = setup
    path = tmp_path / "mc.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in MC_ROWS))
    rows = eval_lib.read_multiple_choice(path)
    res = eval_lib.multiple_choice_eval(cfg, params, tok, rows, batch_size=4)
    acc = acc_norm = 0
    for row, got in zip(MC_ROWS, res["per_row"]):
        ctx_text = row.get("query", row.get("question"))
        lls = []
        for choice in row["choices"]:
            # Independent split: strip the context's trailing spaces by hand, tokenise context and whole text.
            stripped = ctx_text.rstrip()
            cont_text = ctx_text[len(stripped):] + " " + choice
            ctx_ids = tok.encode(stripped)
            cont_ids = tok.encode(stripped + cont_text)[len(ctx_ids):]
            lls.append(_hand_ll(cfg, params, [tok.bos_id] + ctx_ids, cont_ids))
        np.testing.assert_allclose(got["lls"], lls, atol=2e-4)
        gold = row.get("gold", row.get("label"))
        acc += int(np.argmax(lls) == gold)
        acc_norm += int(np.argmax(np.array(lls) / np.array([len(c) for c in row["choices"]])) == gold)
    assert res["acc"] == acc / len(MC_ROWS) and res["acc_norm"] == acc_norm / len(MC_ROWS)
    assert acc != acc_norm  # the fixture tells the two apart (a swapped normalisation would show)
    assert res["rows"] == len(MC_ROWS)


def test_preference_eval_matches_hand_computation(setup):
    cfg, params, tok = setup
    ref = jax.tree.map(lambda x: x * 0.9, params)
    dcfg = data_lib.DataConfig(max_length=64, max_prompt_length=32)
    examples, _ = data_lib.prepare(ROOT / "data" / "sample" / "test.jsonl", dcfg, tok)
    examples = examples[:6]
    res = eval_lib.preference_eval(cfg, params, examples, ref, beta=0.5, batch_size=4)
    pc = np.array([_hand_ll(cfg, params, e["prompt"], e["chosen"]) for e in examples])
    pr = np.array([_hand_ll(cfg, params, e["prompt"], e["rejected"]) for e in examples])
    rc = np.array([_hand_ll(cfg, ref, e["prompt"], e["chosen"]) for e in examples])
    rr = np.array([_hand_ll(cfg, ref, e["prompt"], e["rejected"]) for e in examples])
    np.testing.assert_allclose(res["per_pair"]["policy_chosen"], pc, atol=2e-4)
    np.testing.assert_allclose(res["per_pair"]["reference_rejected"], rr, atol=2e-4)
    assert res["logps/accuracy"] == np.mean(pc > pr)
    np.testing.assert_allclose(res["rewards/margins"], np.mean(0.5 * (pc - rc) - 0.5 * (pr - rr)), atol=2e-4)
    assert res["rewards/accuracies"] == np.mean((pc - rc) > (pr - rr))
    assert res["chosen_logps_decreased"] == np.mean(pc < rc)
    no_ref = eval_lib.preference_eval(cfg, params, examples, beta=0.5, batch_size=4)
    assert "rewards/margins" not in no_ref and no_ref["logps/chosen"] == pytest.approx(res["logps/chosen"])


@pytest.mark.parametrize("row, message", [
    ({"choices": ["a", "b"], "gold": 0}, "needs a string field"),
    ({"query": "q", "choices": ["a"], "gold": 0}, "at least 2"),
    ({"query": "q", "choices": ["a", "b"], "gold": 2}, r"integer gold/label/answer in \[0, 2\)"),
    ({"query": "q", "choices": ["a", "b"]}, "integer"),
])
def test_bad_multiple_choice_rows_name_the_line(tmp_path, row, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(MC_ROWS[0]) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(data_lib.DataError, match=f"bad.jsonl:line 2: .*{message}"):
        eval_lib.read_multiple_choice(path)


def test_evaluate_cli_writes_json(setup, tmp_path, capsys):
    import evaluate

    cfg, params, _ = setup
    checkpoint.save_params(tmp_path / "model", cfg, params)
    out = tmp_path / "results.json"
    rc = evaluate.main(["--model", str(tmp_path / "model"), "--reference", str(tmp_path / "model"),
                        "--preference", str(ROOT / "data" / "sample" / "test.jsonl"),
                        "--mc", str(ROOT / "data" / "sample" / "mc.jsonl"), "--out", str(out),
                        "--max_length", "96", "--max_prompt_length", "48"])
    assert rc == 0
    res = json.loads(out.read_text())["results"]
    pref = res[f"preference:{ROOT / 'data' / 'sample' / 'test.jsonl'}"]
    # The model is its own reference: every implicit reward is zero.
    assert pref["pairs"] == 44 and pref["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    mc = res[f"mc:{ROOT / 'data' / 'sample' / 'mc.jsonl'}"]
    assert mc["rows"] == 20 and 0.0 <= mc["acc"] <= 1.0
    assert "acc_norm" in capsys.readouterr().out
    assert evaluate.main(["--model", str(tmp_path / "missing"), "--mc", "x.jsonl"]) == 2


def test_evaluate_uses_the_model_folders_tokenizer_and_refuses_empty_files(setup, tmp_path, capsys):
    import shutil

    import evaluate

    cfg, params, _ = setup
    checkpoint.save_params(tmp_path / "model", cfg, params)
    assert eval_lib.model_tokenizer_path(tmp_path / "model") is None
    shutil.copy(data_lib.Tokenizer().path, tmp_path / "model" / "tokenizer.model")
    assert eval_lib.model_tokenizer_path(tmp_path / "model") == str(tmp_path / "model" / "tokenizer.model")
    (tmp_path / "empty.jsonl").write_text("")
    rc = evaluate.main(["--model", str(tmp_path / "model"), "--preference", str(tmp_path / "empty.jsonl"),
                        "--out", str(tmp_path / "r.json")])
    captured = capsys.readouterr()
    assert f"tokenizer: {tmp_path / 'model' / 'tokenizer.model'}" in captured.out
    assert rc == 2 and "empty.jsonl: no preference pairs to score" in captured.err
    assert not (tmp_path / "r.json").exists()
