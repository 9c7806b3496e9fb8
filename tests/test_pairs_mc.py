"""ARC / HellaSwag / generic multiple-choice rows -> pairs with lm-evaluation-harness's text (expected by hand)."""

import json
from pathlib import Path

import pytest

from jsmaug.data.files import DataError
from jsmaug.pairs import mc
from jsmaug.pairs.make import make_pairs

FIX = Path(__file__).parent / "fixtures" / "pairs"


def _read(path):
    return [json.loads(x) for x in Path(path).read_text().splitlines()]


def _make(tmp_path, fmt, src, **kw):
    out = tmp_path / f"{fmt}.jsonl"
    summary = make_pairs(fmt, [str(src)], out, **kw)
    return _read(out), summary


def test_arc_pairs_one_per_wrong_choice_with_harness_text(tmp_path):
    pairs, summary = _make(tmp_path, "arc", FIX / "arc.jsonl")
    assert summary.rows_read == 4 and summary.pairs == 3 + 3 + 4 + 2 and not summary.skipped
    q1 = [p for p in pairs if "mass of a rock" in p["prompt"]]
    assert {p["prompt"] for p in q1} == {"Question: Which tool is best for measuring the mass of a rock?\nAnswer:"}
    assert {p["chosen"] for p in q1} == {" a balance"}
    assert sorted(p["rejected"] for p in q1) == [" a ruler", " a stopwatch", " a thermometer"]
    # Numeric labels: answerKey "1" is the first choice.
    q2 = [p for p in pairs if "puddle" in p["prompt"]]
    assert q2[0]["prompt"] == ("Question: A puddle dries up on a sunny afternoon. Where did most of the water go?"
                               "\nAnswer:")
    assert {p["chosen"] for p in q2} == {" into the air as vapor"} and len(q2) == 3
    assert sorted(p["rejected"] for p in q2) == [" down into the rock", " into nearby plants", " up into the Sun"]
    q3 = [p for p in pairs if "source of light" in p["prompt"]]
    assert {p["chosen"] for p in q3} == {" a candle flame"} and len(q3) == 4


def test_arc_max_wrong_draws_k_distinct_wrong_choices(tmp_path):
    pairs, summary = _make(tmp_path, "arc", FIX / "arc.jsonl", max_wrong=3, seed=3)
    assert summary.pairs == 3 + 3 + 3 + 2
    q3 = [p["rejected"] for p in pairs if "source of light" in p["prompt"]]
    assert len(set(q3)) == 3 and set(q3) <= {" a mirror", " the Moon", " a window", " a white wall"}


def test_hellaswag_text_is_the_harness_preprocessing(tmp_path):
    pairs, summary = _make(tmp_path, "hellaswag", FIX / "hellaswag.jsonl")
    assert summary.pairs == 9
    by_prompt = {}
    for p in pairs:
        by_prompt.setdefault(p["prompt"], []).append(p)
    # activity_label + ": " + ctx_a + " " + ctx_b.capitalize(); endings stripped.
    sandwich = by_prompt["Making a sandwich: A man lays two slices of bread on a board. He"]
    assert {p["chosen"] for p in sandwich} == {" spreads butter on both slices."}
    assert sorted(p["rejected"] for p in sandwich) == [
        " paints the board blue.", " starts to juggle the knife and the jar.", " throws the bread into a pond."]
    # " [title]" -> ". ", [bracketed] text removed, double spaces collapsed once; the ending keeps the space that
    # removing "[substeps]" leaves (the harness strips before it removes brackets).
    cactus = by_prompt["Home and Garden: How to water a cactus. Check the soil first. Push a finger into the soil. "
                       "If it feels dry"]
    assert {p["chosen"] for p in cactus} == {"  , water it slowly until water drains out."}
    assert sorted(p["rejected"] for p in cactus) == [
        " , cut off all of its spines.", " , move it into a dark cupboard for a year.",
        " , pour a bucket of sand over it. Sand is good."]
    # str.capitalize lowercases the rest of ctx_b, as Python (and so the harness) does.
    drums = by_prompt["Playing the drums: A girl sits behind a drum kit. She then lifts the sticks"]
    assert {p["chosen"] for p in drums} == {" and begins to play a steady beat."}


def test_preprocess_rule():
    # One pass of replace("  ", " "): three spaces become two, as in the harness.
    assert mc.preprocess("  a [title] b  [step] c ") == "a. b  c"
    assert mc.preprocess("x [title] y") == "x.  y".replace("  ", " ")


def test_generic_mc_uses_the_query_as_it_is(tmp_path):
    pairs, _ = _make(tmp_path, "mc", FIX / "mc.jsonl")
    assert pairs[0] == {"prompt": "Question: Which planet has rings that are easy to see with a small telescope?\n"
                                  "Answer:", "chosen": " Saturn", "rejected": " Mercury"}
    assert [p["rejected"] for p in pairs[3:]] == [" four", " eight", " ten"]


def test_parquet_in_hub_layout_gives_the_same_pairs(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = _read(FIX / "arc.jsonl")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train-00000-of-00001.parquet")
    from_parquet, _ = _make(tmp_path, "arc", tmp_path / "train-00000-of-00001.parquet")
    from_jsonl, _ = _make(tmp_path, "arc", FIX / "arc.jsonl")
    assert from_parquet == from_jsonl


def test_bad_rows_name_file_and_line_or_are_skipped(tmp_path):
    rows = _read(FIX / "arc.jsonl")
    rows[2]["answerKey"] = "Z"
    src = tmp_path / "bad.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n{not json\n")
    with pytest.raises(DataError, match=rf"{src}:line 3: answerKey 'Z' is not one of the labels"):
        make_pairs("arc", [str(src)], tmp_path / "out.jsonl")
    assert not (tmp_path / "out.jsonl").exists()
    _, summary = _make(tmp_path, "arc", src, on_bad_row="skip")
    assert summary.skipped == {"bad row": 2} and summary.pairs == 3 + 3 + 2


def test_hellaswag_test_split_without_labels_is_named(tmp_path):
    row = _read(FIX / "hellaswag.jsonl")[0] | {"label": ""}
    src = tmp_path / "test.jsonl"
    src.write_text(json.dumps(row) + "\n")
    with pytest.raises(DataError, match=r"test.jsonl:line 1: 'label' is empty"):
        make_pairs("hellaswag", [str(src)], tmp_path / "out.jsonl")


def test_fewshot_prefix_never_holds_the_row_itself(tmp_path):
    # Shots drawn from the very file being made into pairs: each prompt's examples are the other questions.
    pairs, _ = _make(tmp_path, "arc", FIX / "arc.jsonl", shots=3, shots_from=[str(FIX / "arc.jsonl")], seed=1)
    solved = {q.prompt: q.solved() for q in (mc.arc_question(r, "x") for r in _read(FIX / "arc.jsonl"))}
    for p in pairs:
        blocks = p["prompt"].split("\n\n")
        own = blocks[-1]
        assert own in solved and len(blocks) == 4
        shots = blocks[:-1]
        assert all(s in solved.values() for s in shots) and len(set(shots)) == 3
        assert solved[own] not in shots and not any(s.startswith(own) for s in shots)
    with pytest.raises(DataError, match="--shots 4: .* has only 3 examples other than this row"):
        make_pairs("arc", [str(FIX / "arc.jsonl")], tmp_path / "o.jsonl", shots=4,
                   shots_from=[str(FIX / "arc.jsonl")])
