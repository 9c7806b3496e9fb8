"""The export's tokenizer files: the hub's values, `</s>` typed as text is the EOS id, and transformers'
AutoTokenizer gives exactly [<s>] + jsmaug's ids (SentencePiece's, on text without special-token strings)."""

import json
from pathlib import Path

import pytest

from jsmaug.data import batches as data, tokenizer_files as hf_tokenizer

HUB = Path(__file__).parent / "fixtures" / "mixtral_8x7b_v0.1"
TEXTS = ["Hello world", " leading space", "  two leading", "a  b   c    d", "trailing  ", "x\n\ny", "tab\there\t",
         "12345 + 678 = 999", "3.14159", "naïve café 日本語 😀 Ελληνικά", "", " ", "   ", "line\n  indented",
         "Question: Which planet is closest to the Sun?\nAnswer: Mercury"]
SPECIAL_TEXTS = ["<s> and </s> as text", "Answer: Zoe</s>", "a</s> b", "a </s>b", "x<s>y<unk>z", "</s></s>",
                 "<s>[INST] hi [/INST] ok</s>"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    tok = data.Tokenizer()
    names = hf_tokenizer.write_tokenizer_files(tok.path, out)
    return tok, out, names


def test_files_carry_the_hub_values(exported):
    tok, out, names = exported
    assert sorted(names) == sorted(p.name for p in out.iterdir()) == sorted(
        ["tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"])
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    hub = json.loads((HUB / "tokenizer_config.json").read_text())
    deliberate = {"tokenizer_class"}  # PreTrainedTokenizerFast (see hf_tokenizer.HUB_TOKENIZER_CONFIG)
    assert set(cfg) == set(hub)
    assert {k: v for k, v in cfg.items() if k not in deliberate} == {k: v for k, v in hub.items() if k not in deliberate}
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast" and "split_special_tokens" not in cfg
    assert json.loads((out / "special_tokens_map.json").read_text()) == json.loads(
        (HUB / "special_tokens_map.json").read_text())
    tj = json.loads((out / "tokenizer.json").read_text())
    assert len(tj["model"]["vocab"]) == 32000 and tj["model"]["byte_fallback"] is True
    assert tj["model"]["vocab"]["<s>"] == 1 and tj["model"]["vocab"]["\u2581Hello"] == tok.sp.piece_to_id("\u2581Hello")
    assert [(t["id"], t["content"], t["normalized"], t["special"]) for t in tj["added_tokens"]] == [
        (0, "<unk>", False, True), (1, "<s>", False, True), (2, "</s>", False, True)]


def test_auto_tokenizer_equals_jsmaug_and_reads_the_eos_string_as_eos(exported):
    from transformers import AutoTokenizer

    tok, out, _ = exported
    auto = AutoTokenizer.from_pretrained(str(out))
    assert auto.bos_token_id == 1 and auto.eos_token_id == 2 and auto.padding_side == "right"
    assert auto("</s>", add_special_tokens=False).input_ids == [2]  # TRL appends this string to completions
    for text in TEXTS:
        assert auto(text).input_ids == [1] + tok.sp.encode(text) == [1] + tok.encode(text), repr(text)
        assert auto(text, add_special_tokens=False).input_ids == tok.encode(text), repr(text)
    for text in SPECIAL_TEXTS:
        assert auto(text).input_ids == [1] + tok.encode(text), repr(text)
    for text in ("Hello world", "12345 + 678 = 999", "naïve café 日本語 😀"):
        assert auto.decode(auto(text).input_ids, skip_special_tokens=True) == text


def test_a_chat_template_goes_into_the_config(tmp_path):
    src = open("configs/chat_templates/mixtral_instruct.jinja").read()
    hf_tokenizer.write_tokenizer_files(data.Tokenizer().path, tmp_path, chat_template=src)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["chat_template"] == src
