"""The export's tokenizer files: transformers' AutoTokenizer gives exactly [<s>] + SentencePiece's ids."""

import json

import pytest

from jsmaug import data, hf_tokenizer

TEXTS = ["Hello world", " leading space", "  two leading", "a  b   c    d", "trailing  ", "x\n\ny", "tab\there\t",
         "12345 + 678 = 999", "3.14159", "naïve café 日本語 😀 Ελληνικά", "", " ", "   ", "line\n  indented",
         "<s> and </s> as text", "Question: Which planet is closest to the Sun?\nAnswer: Mercury"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    tok = data.Tokenizer()
    names = hf_tokenizer.write_tokenizer_files(tok.path, out, model_max_length=32768)
    return tok, out, names


def test_files_are_what_a_mixtral_hub_repo_ships(exported):
    tok, out, names = exported
    assert sorted(names) == sorted(p.name for p in out.iterdir()) == sorted(
        ["tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"])
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert cfg["add_bos_token"] is True and cfg["add_eos_token"] is False
    assert (cfg["bos_token"], cfg["eos_token"], cfg["unk_token"]) == ("<s>", "</s>", "<unk>")
    tj = json.loads((out / "tokenizer.json").read_text())
    assert len(tj["model"]["vocab"]) == 32000 and tj["model"]["byte_fallback"] is True
    assert tj["model"]["vocab"]["<s>"] == 1 and tj["model"]["vocab"]["\u2581Hello"] == tok.sp.piece_to_id("\u2581Hello")


def test_auto_tokenizer_equals_sentencepiece_with_bos(exported):
    from transformers import AutoTokenizer

    tok, out, _ = exported
    auto = AutoTokenizer.from_pretrained(str(out))
    assert auto.bos_token_id == 1 and auto.eos_token_id == 2
    for text in TEXTS:
        assert auto(text).input_ids == [1] + tok.encode(text), repr(text)
        assert auto(text, add_special_tokens=False).input_ids == tok.encode(text), repr(text)
    for text in ("Hello world", "12345 + 678 = 999", "naïve café 日本語 😀"):
        assert auto.decode(auto(text).input_ids, skip_special_tokens=True) == text
