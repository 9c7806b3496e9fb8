"""GSM8K scored by generation (`jsmaug.eval.gsm8k`): the task's strings against lm-eval's installed gsm8k.yaml,
extraction and exact match against lm-eval's own filter and metric code, stop sequences, EOS, truncation and
an empty completion on a fixture whose generations are given, the figures against NumPy, bad rows."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from jsmaug.data import batches as data_lib
from jsmaug.eval import generation, gsm8k
from jsmaug.models import config as config_lib
from jsmaug.models import generate as gen

lm_eval = pytest.importorskip("lm_eval")  # in the test extra; the scoring itself does not need it

ROWS = [
    {"question": "Raj buys 4 mugs at $14 each. How much?", "answer": "4 * 14 = <<4*14=56>>56\n#### 56"},
    {"question": "Ella has 1,200 cards and buys 34 more. How many?", "answer": "1200 + 34 = 1234\n#### 1,234"},
    {"question": "Ben has 5 apples and eats 7. Result?", "answer": "5 - 7 = -2\n#### -2"},
    {"question": "Mia earns $3 an hour for 2 hours. Pay?", "answer": "3 * 2 = 6\n#### 6"},
    {"question": "How many legs do 2 cats have?", "answer": "2 * 4 = 8\n#### 8"},
]


def _gsm8k_yaml() -> dict:
    import yaml

    return yaml.safe_load((Path(lm_eval.__file__).parent / "tasks" / "gsm8k" / "gsm8k.yaml").read_text())


def test_the_task_strings_are_those_of_the_installed_gsm8k_yaml():
    from lm_eval.models.huggingface import HFLM

    cfg = _gsm8k_yaml()
    assert cfg["doc_to_text"] == gsm8k.DOC_TO_TEXT.replace("{question}", "{{question}}")
    assert cfg["doc_to_target"] == "{{answer}}" and cfg["output_type"] == "generate_until"
    assert tuple(cfg["generation_kwargs"]["until"]) == gsm8k.UNTIL
    assert cfg["generation_kwargs"]["do_sample"] is False
    (metric,) = cfg["metric_list"]
    assert metric["metric"] == "exact_match" and metric["ignore_case"] is gsm8k.IGNORE_CASE
    assert metric["ignore_punctuation"] is False
    assert tuple(metric["regexes_to_ignore"]) == gsm8k.REGEXES_TO_IGNORE
    strict, flexible = cfg["filter_list"]
    assert strict["name"] == "strict-match" and flexible["name"] == "flexible-extract"
    assert strict["filter"][0]["regex_pattern"] == gsm8k.STRICT_PATTERN and "group_select" not in strict["filter"][0]
    assert flexible["filter"][0]["regex_pattern"] == gsm8k.FLEXIBLE_PATTERN
    assert flexible["filter"][0]["group_select"] == -1
    assert HFLM.max_gen_toks.fget(None) == generation.LM_EVAL_MAX_GEN_TOKS


COMPLETIONS = [
    " 4 * 14 = 56\n#### 56",           # strict and flexible
    " The total is $1,234.",           # no '####': strict invalid; flexible '$1,234.' -> '1234'
    " 5 - 7 = -2.\n#### -2.",          # trailing period removed by the normalisation
    " She earns 6 dollars, not 60",    # flexible takes the LAST number: 60 (wrong)
    "",                                # an empty completion: both invalid
    " #### 8 and then #### 9",         # strict takes the FIRST match
    " The answer is 1.5e3 or .",       # flexible: the last match is '3', the regex's second group
    " ANSWER #### 12,5",
]


def test_extraction_and_exact_match_equal_lm_eval_filters_and_metric():
    from lm_eval.api.metrics import exact_match_hf_evaluate
    from lm_eval.filters.extraction import RegexFilter
    from lm_eval.filters.selection import TakeFirstFilter

    cfg = _gsm8k_yaml()
    kwargs = {k: v for k, v in cfg["metric_list"][0].items() if k not in ("metric", "aggregation", "higher_is_better")}
    for spec, ours in ((cfg["filter_list"][0]["filter"][0], gsm8k.extract_strict),
                       (cfg["filter_list"][1]["filter"][0], gsm8k.extract_flexible)):
        rf = RegexFilter(**{k: v for k, v in spec.items() if k != "function"})
        theirs = TakeFirstFilter().apply(rf.apply([[c] for c in COMPLETIONS], None), None)
        assert [ours(c) for c in COMPLETIONS] == list(theirs)
        for c, t in zip(COMPLETIONS, theirs):
            for ref in ("x\n#### 1234", "#### 1,234", "#### 56", "#### -2", "#### 8", "#### 60", "#### 12,5"):
                want = exact_match_hf_evaluate(predictions=[t], references=[ref], **kwargs)["exact_match"]
                assert gsm8k.exact_match(ours(c), ref) == want, (c, ref)
    # Values a reader can check by hand.
    assert [gsm8k.extract_strict(c) for c in COMPLETIONS] == [
        "56", "[invalid]", "-2.", "[invalid]", "[invalid]", "8", "[invalid]", "12,5"]
    assert [gsm8k.extract_flexible(c) for c in COMPLETIONS] == [
        "56", "$1,234.", "-2.", "60", "[invalid]", "9", "3", "12,5"]
    assert gsm8k.normalise("$1,234.") == "1234" and gsm8k.normalise("ab\n#### 1,234") == "1234"
    assert gsm8k.normalise("[invalid]") == "[invalid]" and gsm8k.normalise("ABC") == "abc"


def test_stop_sequences_and_cutting():
    tok = data_lib.Tokenizer()
    assert generation.stop_sequences(tok, gsm8k.UNTIL) == ["Question:", "</s>", "<|im_end|>"]  # EOS already there
    assert generation.cut_at_stops("a\n\nQuestion: b<|im_end|>c", ["Question:", "<|im_end|>"]) == "a\n\n"
    assert generation.cut_at_stops("a<|im_end|>b Question:", ["Question:", "<|im_end|>"]) == "a"
    assert generation.cut_at_stops("Question: x", ["Question:"]) == ""


@pytest.fixture(params=["stop_check", "no_stop_check"])
def controlled(monkeypatch, request):
    """`generate` replaced by one that returns, for each prompt, the tokens of a completion text given per row
    (then EOS and more text, which must be dropped), recording the prompt ids it was given. Twice: with the
    `stop_check` argument of interface (C), and without it (generate to the end, then cut)."""
    tok = data_lib.Tokenizer()
    cfg = config_lib.tiny(vocab_size=32000, max_position_embeddings=256)
    seen, texts = [], {}

    def fake_generate(config, params, prompts, sampling, seed=0, pad_multiple=16, stop_check=None):
        assert sampling.temperature == 0.0 and sampling.eos_id == tok.eos_id
        out = []
        for r, ids in enumerate(prompts):
            seen.append(list(ids))
            text, after_eos = texts[tuple(ids)]
            new = tok.encode(text) + ([tok.eos_id] + tok.encode(after_eos) if after_eos is not None else [])
            new = new[:sampling.max_new_tokens]
            if stop_check is not None:  # what generate does with it: stop once it says so
                for n in range(1, len(new) + 1):
                    if stop_check(r, new[:n]):
                        new = new[:n]
                        break
            if tok.eos_id in new:  # generate's own EOS rule: the row ends with its EOS
                new = new[:new.index(tok.eos_id) + 1]
            out.append(new)
        return out

    def fake_generate_without_stop_check(config, params, prompts, sampling, seed=0, pad_multiple=16):
        return fake_generate(config, params, prompts, sampling, seed, pad_multiple)

    monkeypatch.setattr(gen, "generate", fake_generate if request.param == "stop_check"
                        else fake_generate_without_stop_check)
    return tok, cfg, seen, texts


GIVEN = [  # (completion text generated, text after an EOS or None for no EOS), expected completion
    ((" 4 * 14 = 56\n#### 56\n\nQuestion: What is 2 + 2?\nAnswer: 4", None), " 4 * 14 = 56\n#### 56\n\n"),
    ((" The total is $1,234.", " #### 99"), " The total is $1,234."),
    ((" 5 - 7 = -2.\n#### -2.<|im_end|> more", None), " 5 - 7 = -2.\n#### -2."),
    (("", " #### 6"), ""),  # EOS first: an empty completion
    ((" 2 cats, 4 legs each: 8. Question: next", None), " 2 cats, 4 legs each: 8. "),
]


def test_gsm8k_eval_on_given_generations(controlled, capsys):
    tok, cfg, seen, texts = controlled
    prompts = gsm8k.build_prompts(ROWS)
    for prompt, (gen_text, _) in zip(prompts, GIVEN):
        texts[tuple(tok.encode_with_special_tokens(prompt))] = gen_text
    res = gsm8k.gsm8k_eval(cfg, None, tok, ROWS, max_new_tokens=64, batch_size=2)
    assert [r["completion"] for r in res["rows"]] == [want for _, want in GIVEN]
    assert [r["strict"] for r in res["rows"]] == ["56", "[invalid]", "-2.", "[invalid]", "[invalid]"]
    assert [r["flexible"] for r in res["rows"]] == ["56", "$1,234.", "-2.", "[invalid]", "8."]
    assert [r["target"] for r in res["rows"]] == ["56", "1234", "-2", "6", "8"]
    strict = np.array([1, 0, 1, 0, 0.0])
    flexible = np.array([1, 1, 1, 0, 1.0])
    assert [r["exact_match,strict-match"] for r in res["rows"]] == strict.tolist()
    assert [r["exact_match,flexible-extract"] for r in res["rows"]] == flexible.tolist()
    assert res["exact_match,strict-match"] == pytest.approx(strict.mean())
    assert res["exact_match,flexible-extract"] == pytest.approx(flexible.mean())
    assert res["exact_match_stderr,strict-match"] == pytest.approx(strict.std(ddof=1) / math.sqrt(5))
    assert res["exact_match_stderr,flexible-extract"] == pytest.approx(flexible.std(ddof=1) / math.sqrt(5))
    assert res["task"] == "gsm8k" and res["num_fewshot"] == 0 and res["n"] == 5
    assert [r["prompt"] for r in res["rows"]] == prompts and prompts[0] == f"Question: {ROWS[0]['question']}\nAnswer:"
    # Contexts are tokenised as transformers' tokenizer(text): with BOS.
    assert all(ids[0] == tok.bos_id for ids in seen)
    err = capsys.readouterr().err
    assert "gsm8k: 5/5 rows" in err and "rows/s" in err and "exact match strict 0.400, flexible 0.800" in err


def test_long_contexts_keep_their_last_tokens(controlled):
    tok, cfg, seen, texts = controlled
    rows = [{"question": "word " * 400, "answer": "#### 1", "where": "x"}]
    ids = tok.encode_with_special_tokens(gsm8k.build_prompts(rows)[0])
    budget = cfg.max_position_embeddings - 16
    assert len(ids) > budget
    texts[tuple(ids[-budget:])] = (" #### 1", None)
    res = gsm8k.gsm8k_eval(cfg, None, tok, rows, max_new_tokens=16, batch_size=1, progress=False)
    assert seen == [ids[-budget:]] and res["exact_match,strict-match"] == 1.0
    with pytest.raises(ValueError, match="must be less than the model's maximum sequence length"):
        gsm8k.gsm8k_eval(cfg, None, tok, rows, max_new_tokens=256, progress=False)


def test_one_row_has_no_stderr(controlled):
    tok, cfg, _, texts = controlled
    texts[tuple(tok.encode_with_special_tokens(gsm8k.build_prompts(ROWS[:1])[0]))] = (" #### 56", None)
    res = gsm8k.gsm8k_eval(cfg, None, tok, ROWS[:1], max_new_tokens=8, progress=False)
    assert res["exact_match,strict-match"] == 1.0 and res["exact_match_stderr,strict-match"] is None


@pytest.mark.parametrize("row, message", [
    ({"question": "q", "answer": "the answer is 5"}, "'answer' has no '#### N' final answer"),
    ({"question": "q", "answer": "####5"}, "'answer' has no '#### N'"),
    ({"answer": "#### 5"}, "needs a string field 'question'"),
    ({"question": "q", "answer": 5}, "needs a string field 'answer'"),
])
def test_bad_rows_name_the_file_and_line(tmp_path, row, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(data_lib.DataError, match=f"bad.jsonl:line 2: {message}"):
        gsm8k.read_gsm8k(path)


def test_fewshot_needs_enough_rows():
    pool = [dict(r, where="pool.jsonl:line 1") for r in ROWS[:2]]
    with pytest.raises(data_lib.DataError, match="pool.jsonl: num_fewshot=3 needs at least 3 rows, it has 2"):
        gsm8k.build_prompts(ROWS, num_fewshot=3, fewshot_rows=pool)
    with pytest.raises(data_lib.DataError, match="needs few-shot rows"):
        gsm8k.build_prompts(ROWS, num_fewshot=1)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    import jax

    from jsmaug.models import decoder as model
    from jsmaug.train import checkpoint

    cfg = config_lib.tiny(vocab_size=32000, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, num_local_experts=3,
                          max_position_embeddings=512)
    params = jax.jit(model.init_params, static_argnums=0)(cfg, jax.random.key(1))
    params = dict(params, lm_head=params["lm_head"] * 40.0)
    path = tmp_path_factory.mktemp("gsm8k_cli") / "model"
    checkpoint.save_params(path, cfg, params)
    return path, cfg, params


def test_evaluate_cli_generate_on_a_tiny_checkpoint(tiny_checkpoint, tmp_path, capsys):
    """`jsmaug evaluate --generate` with 2 shots: OUT.json in interface (A)'s layout; every completion equals
    that of one plain `generate` call (batching, padding and sorting change nothing); progress on stderr;
    the results go into a model card that huggingface_hub reads."""
    from huggingface_hub import ModelCard

    from jsmaug.cli import evaluate

    path, cfg, params = tiny_checkpoint
    test, train = tmp_path / "test.jsonl", tmp_path / "train.jsonl"
    test.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    train.write_text("".join(json.dumps(r) + "\n" for r in ROWS[::-1]))
    card_dir = tmp_path / "card"
    card_dir.mkdir()
    out = tmp_path / "out.json"
    rc = evaluate.main(["--model", str(path), "--generate", str(test), "--num_fewshot", "2", "--fewshot_file",
                        str(train), "--max_new_tokens", "6", "--batch_size", "4", "--out", str(out),
                        "--card", str(card_dir)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    doc = json.loads(out.read_text())
    res = doc["results"][f"generate:{test}"]
    assert doc["model"] == str(path) and res["task"] == "gsm8k" and res["num_fewshot"] == 2 and res["n"] == 5
    for key in ("exact_match,strict-match", "exact_match_stderr,strict-match", "exact_match,flexible-extract",
                "exact_match_stderr,flexible-extract"):
        assert 0.0 <= res[key] <= 1.0
    assert set(res["rows"][0]) == {"prompt", "completion", "strict", "flexible", "target",
                                   "exact_match,strict-match", "exact_match,flexible-extract"}
    tok = data_lib.Tokenizer()
    prompts = gsm8k.build_prompts(ROWS, num_fewshot=2, fewshot_rows=gsm8k.read_gsm8k(train))
    assert [r["prompt"] for r in res["rows"]] == prompts
    # The same prompts as one batch in file order (the CLI sorts by length, batches 4 + 1 and pads to 32).
    sampling = gen.SamplingConfig(max_new_tokens=6, eos_id=tok.eos_id)
    direct = gen.generate(cfg, params, [tok.encode_with_special_tokens(p) for p in prompts], sampling)
    for toks, row in zip(direct, res["rows"]):
        toks = toks[:toks.index(tok.eos_id)] if tok.eos_id in toks else toks
        assert row["completion"] == generation.cut_at_stops(tok.decode(toks), ["Question:", "</s>", "<|im_end|>"])
    assert "gsm8k: 4/5 rows" in captured.err and "gsm8k: 5/5 rows" in captured.err
    card = ModelCard.load(card_dir / "README.md")
    values = {(r.metric_type, r.metric_config): r.metric_value for r in card.data.eval_results}
    assert values[("exact_match", "strict-match")] == pytest.approx(res["exact_match,strict-match"])


def test_evaluate_cli_checks_inputs_before_scoring(tiny_checkpoint, tmp_path, capsys):
    from jsmaug.cli import evaluate

    path, _, _ = tiny_checkpoint
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps({"question": "q", "answer": "no final answer"}) + "\n")
    out = tmp_path / "out.json"
    assert evaluate.main(["--model", str(path), "--generate", str(bad), "--out", str(out)]) == 2
    assert "bad.jsonl:line 2: 'answer' has no '#### N'" in capsys.readouterr().err and not out.exists()
    with pytest.raises(SystemExit):
        evaluate.main(["--model", str(path), "--generate", str(bad), "--num_fewshot", "2"])
    assert "--num_fewshot needs --fewshot_file" in capsys.readouterr().err
