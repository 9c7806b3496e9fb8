"""TRL's preference formats (standard, implicit prompt, conversational) and chat templates, against TRL's and
transformers' own code."""

import json

import numpy as np
import pytest

from jsmaug.data import batches as data, tokenizer_files as hf_tokenizer, formats as pair_formats

TOK = data.Tokenizer()
TEMPLATE = "configs/chat_templates/mixtral_instruct.jinja"


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _ids(examples):
    return [(e["prompt"].tolist(), e["chosen"].tolist(), e["rejected"].tolist()) for e in examples]


def test_implicit_prompt_equals_the_standard_row_and_trls_extract_prompt(tmp_path):
    from trl.data_utils import extract_prompt as trl_extract

    standard = [{"prompt": "Q: 2+3?\nA:", "chosen": " 5", "rejected": " 6"},
                {"prompt": "Name a colour.", "chosen": " Blue, like the sky.", "rejected": " Green, like grass."}]
    implicit = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in standard]
    a, rep_a = data.prepare(_write(tmp_path / "s.jsonl", standard), data.DataConfig(), TOK)
    b, rep_b = data.prepare(_write(tmp_path / "i.jsonl", implicit), data.DataConfig(), TOK)
    assert _ids(a) == _ids(b) and "(implicit prompt format)" in str(rep_b) and "(standard format)" in str(rep_a)
    cases = [("The sky is blue.", "The sky is green."), ("abc", "abcd"), ("x y z", "x y w"),
             ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
              [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "no"}]),
             ([{"role": "user", "content": "a"}], [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])]
    for chosen, rejected in cases:
        want = trl_extract({"chosen": chosen, "rejected": rejected})
        assert pair_formats.extract_prompt(chosen, rejected) == (want["prompt"], want["chosen"], want["rejected"])


CONV = [{"prompt": [{"role": "user", "content": "What colour is the sky?"}],
         "chosen": [{"role": "assistant", "content": "It is blue."}],
         "rejected": [{"role": "assistant", "content": "It is green."}]},
        {"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                    {"role": "user", "content": "2+2?"}],
         "chosen": [{"role": "assistant", "content": " 4"}], "rejected": [{"role": "assistant", "content": " 5"}]}]


def test_conversations_render_and_tokenise_as_transformers_and_trl_do(tmp_path):
    from transformers import AutoTokenizer
    from trl.data_utils import common_prefix_length

    hf_tokenizer.write_tokenizer_files(TOK.path, tmp_path, chat_template=open(TEMPLATE).read())
    auto = AutoTokenizer.from_pretrained(str(tmp_path))
    ex, rep = data.prepare(_write(tmp_path / "c.jsonl", CONV), data.DataConfig(chat_template=TEMPLATE), TOK)
    assert rep.kept == 2 and "(conversational format)" in str(rep)
    for row, (p, c, r) in zip(CONV, _ids(ex)):
        # TRL 1.16's tokenize_fn for conversational rows, with transformers' apply_chat_template.
        prompt_ids = auto.apply_chat_template(row["prompt"], tokenize=True, add_generation_prompt=True,
                                              return_dict=True)["input_ids"]
        full = [auto.apply_chat_template(row["prompt"] + row[k], tokenize=True, return_dict=True)["input_ids"]
                for k in ("chosen", "rejected")]
        n = min(common_prefix_length(prompt_ids, f) for f in full)
        assert (p, c, r) == (prompt_ids[:n], full[0][n:], full[1][n:])
        assert p[0] == 1 and c[-1] == 2 and r[-1] == 2 and p.count(1) == 1  # the template's <s> and </s>, once
    assert TOK.decode(ex[0]["prompt"].tolist() + ex[0]["chosen"].tolist()) == \
        "[INST] What colour is the sky? [/INST]It is blue."
    # The same conversations with an implicit prompt give the same ids.
    implicit = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in CONV]
    ex2, rep2 = data.prepare(_write(tmp_path / "ci.jsonl", implicit), data.DataConfig(chat_template=TEMPLATE), TOK)
    assert _ids(ex2) == _ids(ex) and "(conversational, implicit prompt format)" in str(rep2)
    # data.chat_template=tokenizer reads the template of the tokenizer's folder (an export's).
    ex3, _ = data.prepare(tmp_path / "c.jsonl", data.DataConfig(chat_template="tokenizer",
                                                                tokenizer_path=str(tmp_path / "tokenizer.model")))
    assert _ids(ex3) == _ids(ex)


@pytest.mark.parametrize("bad,message", [
    ({"prompt": "not a list", "chosen": [], "rejected": []}, "field 'prompt' must be a non-empty list of messages"),
    ({"prompt": [{"role": "user"}], "chosen": [{"role": "assistant", "content": "a"}],
      "rejected": [{"role": "assistant", "content": "b"}]}, "field 'prompt': message 0 needs a string 'content'"),
    ({"prompt": [{"role": "user", "content": "q"}], "chosen": ["text"],
      "rejected": [{"role": "assistant", "content": "b"}]}, "field 'chosen': message 0 must be an object"),
    ({"prompt": [{"role": "system", "content": "q"}], "chosen": [{"role": "assistant", "content": "a"}],
      "rejected": [{"role": "assistant", "content": "b"}]}, "roles must alternate"),
    ({"chosen": [{"role": "user", "content": "a"}]}, "missing field 'prompt'"),
])
def test_a_malformed_message_list_is_a_bad_row_named_by_file_and_line(tmp_path, bad, message):
    f = _write(tmp_path / "conv.jsonl", [CONV[0], bad, CONV[1]])
    cfg = data.DataConfig(chat_template=TEMPLATE)
    with pytest.raises(data.DataError, match=rf"conv.jsonl:line 2: .*{message}"):
        data.prepare(f, cfg, TOK)
    ex, rep = data.prepare(f, data.DataConfig(chat_template=TEMPLATE, on_bad_row="skip"), TOK)
    assert len(ex) == 2 and rep.read == 3 and "line 2" in rep.skipped_rows[0]


def test_format_errors_are_named(tmp_path):
    with pytest.raises(data.DataError, match=r"conv.jsonl: the rows are conversations .* need a chat template"):
        data.prepare(_write(tmp_path / "conv.jsonl", CONV), data.DataConfig(), TOK)
    mixed = _write(tmp_path / "mixed.jsonl", [{"prompt": "p", "chosen": " a", "rejected": " b"},
                                              {"chosen": "p a", "rejected": "p b"}])
    with pytest.raises(data.DataError, match=r"mixed.jsonl:line 2: missing field 'prompt' \(the file is in the "
                                             r"standard format, read from its first row\)"):
        data.prepare(mixed, data.DataConfig(), TOK)
    with pytest.raises(data.DataError, match="data.chat_template: nope.jinja: no such file"):
        data.prepare(mixed, data.DataConfig(chat_template="nope.jinja"), TOK)
    with pytest.raises(data.DataError, match="has no chat_template.jinja and no chat_template"):
        data.prepare(mixed, data.DataConfig(chat_template="tokenizer"), TOK)
    (tmp_path / "broken.jinja").write_text("{% if %}")
    with pytest.raises(data.DataError, match=r"chat template .*broken.jinja:1: "):
        data.prepare(mixed, data.DataConfig(chat_template=str(tmp_path / "broken.jinja")), TOK)


def test_rendered_prompt_is_cut_by_the_same_rule():
    tmpl = pair_formats.load_chat_template(TEMPLATE, TOK)
    text = tmpl.render([{"role": "user", "content": "one two three four five"}], add_generation_prompt=True)
    assert text == "<s>[INST] one two three four five [/INST]"
    ids = pair_formats.row_ids("x", CONV[0], pair_formats.CONVERSATIONAL, ("prompt", "chosen", "rejected"), TOK, tmpl)
    ex = data.truncate(*ids, max_length=64, max_prompt_length=4, bos_id=1)
    assert ex["prompt"].tolist() == [1] + ids[0][-3:]
    assert np.array_equal(ex["chosen"], ids[1])
