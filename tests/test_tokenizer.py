"""Pair tokenisation: the joined text split where the prompt ends (TRL 1.16's rule), special-token strings,
truncation. Exact ids with the real Mixtral tokenizer."""

import numpy as np
from hypothesis import given, settings, strategies as st

from jsmaug.data.tokenizer import Tokenizer, common_prefix_length, split_at_prompt, tokenize_pair, truncate

TOK = Tokenizer()
SP = TOK.sp


def test_encode_is_sentencepiece_on_text_and_maps_special_strings_to_their_ids():
    assert TOK.encode("Hello world") == SP.encode("Hello world") == [22557, 1526]
    # The hub tokenizer's reading: "</s>" is the EOS id, and the text after it is encoded as a piece of its own.
    assert TOK.encode("Answer: Zoe</s>") == SP.encode("Answer: Zoe") + [2]
    assert TOK.encode("a</s> b") == SP.encode("a") + [2] + SP.encode(" b")
    assert TOK.encode("x<s>y<unk>") == SP.encode("x") + [1] + SP.encode("y") + [0]
    assert TOK.encode("</s>") == [2] and TOK.encode("") == []
    assert SP.encode("</s>") == [1867, 28713, 28767]  # what plain SentencePiece would have made of it


def test_a_completion_that_starts_with_a_space_gets_no_extra_piece():
    prompt, chosen, rejected = "Question: Who is older?\nAnswer:", " Zoe", " Omar"
    ex = tokenize_pair(TOK, prompt, chosen, rejected, max_length=64, max_prompt_length=32)
    assert ex["prompt"].tolist() == [1] + SP.encode(prompt)
    assert [SP.id_to_piece(int(i)) for i in ex["chosen"]] == ["\u2581Z", "oe", "</s>"]
    # Alone, " Zoe" has an extra "▁" piece: the old, wrong tokenisation.
    assert [SP.id_to_piece(i) for i in SP.encode(chosen)] == ["\u2581", "\u2581Z", "oe"]
    # The row is exactly the joined text's ids, with EOS.
    for comp, ids in ((chosen, ex["chosen"]), (rejected, ex["rejected"])):
        assert ex["prompt"].tolist() + ids.tolist() == [1] + SP.encode(prompt + comp) + [2]
    assert TOK.decode(ex["prompt"].tolist() + ex["chosen"].tolist()) == prompt + chosen


def test_tokens_merged_across_the_boundary_start_the_completion():
    ex = tokenize_pair(TOK, "Hello wor", "ld", "ld peace", max_length=32, max_prompt_length=16)
    assert [SP.id_to_piece(int(i)) for i in ex["prompt"]] == ["<s>", "\u2581Hello"]
    assert [SP.id_to_piece(int(i)) for i in ex["chosen"]] == ["\u2581world", "</s>"]
    assert ex["prompt"].tolist() + ex["rejected"].tolist() == [1] + SP.encode("Hello world peace") + [2]
    # The shorter common prefix over chosen and rejected: a merge on one side moves both completions' start.
    p, c, r = split_at_prompt([1, 5, 6, 7], [1, 5, 6, 9, 2], [1, 5, 6, 7, 8, 2])
    assert (p, c, r) == ([1, 5, 6], [9, 2], [7, 8, 2])
    assert common_prefix_length([1, 2, 3], [1, 2]) == 2 and common_prefix_length([], [1]) == 0


def test_eos_string_at_the_end_is_not_added_twice():
    ex = tokenize_pair(TOK, "Q:", " yes</s>", " no", max_length=32, max_prompt_length=16)
    assert ex["chosen"].tolist() == SP.encode("Q: yes")[len(SP.encode("Q:")):] + [2]
    assert ex["chosen"].tolist().count(2) == 1 and ex["rejected"].tolist()[-1] == 2


def test_truncation_keeps_its_meaning():
    prompt = "one two three four five six seven eight nine ten"
    p_ids = SP.encode(prompt)
    # 1) prompt cut from the LEFT, keeping <s> and its end
    ex = tokenize_pair(TOK, prompt, " yes", " no", max_length=64, max_prompt_length=5)
    assert ex["prompt"].tolist() == [1] + p_ids[-4:]
    # 2) completion cut from the RIGHT (no </s> when cut)
    long = " a b c d e f g h i j k l"
    ex = tokenize_pair(TOK, "Q", long, " no", max_length=8, max_prompt_length=4)
    room = 8 - len(ex["prompt"])
    assert ex["chosen"].tolist() == SP.encode("Q" + long)[1:][:room] and 2 not in ex["chosen"].tolist()
    assert ex["rejected"].tolist() == SP.encode("Q no")[1:] + [2]
    # 3) prompt alone leaves no room: dropped with a reason
    assert tokenize_pair(TOK, prompt, " x", " y", max_length=5, max_prompt_length=5) == "prompt_too_long"
    # 4) a rendered conversation without <s> keeps no <s> when cut
    assert truncate([7, 8, 9], [4], [5], max_length=8, max_prompt_length=2, bos_id=1)["prompt"].tolist() == [8, 9]
    assert truncate([], [4], [5], 8, 4, 1) == "empty_prompt"


TEXT = st.text(alphabet=list("ab cd\n12.?:é日😀"), min_size=0, max_size=12)


@settings(max_examples=60, deadline=None)
@given(prompt=TEXT, chosen=TEXT.filter(str.strip), rejected=TEXT.filter(str.strip))
def test_any_pair_is_its_joined_text(prompt, chosen, rejected):
    ex = tokenize_pair(TOK, prompt, chosen, rejected, max_length=256, max_prompt_length=128)
    prompt_ids = [1] + TOK.encode(prompt)
    assert prompt_ids[:len(ex["prompt"])] == ex["prompt"].tolist()  # a prefix of the prompt's own ids
    for comp, ids in ((chosen, ex["chosen"]), (rejected, ex["rejected"])):
        assert ex["prompt"].tolist() + ids.tolist() == [1] + TOK.encode(prompt + comp) + [2]
        assert len(ids) >= 1 and isinstance(ids, np.ndarray) and ids.dtype == np.int32
