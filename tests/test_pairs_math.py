"""MetaMath / GSM8K pairs: rejected = chosen with ONE computed intermediate result changed, final answer kept."""

import importlib.util
import json
import random
import re
from decimal import Decimal
from pathlib import Path

import pytest

from jsmaug.pairs import math as m
from jsmaug.pairs.make import make_pairs

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures" / "pairs"
NUMBER = re.compile(r"\d+(?:,\d{3})*(?:\.\d+)?")


def _read(path):
    return [json.loads(x) for x in Path(path).read_text().splitlines()]


def _value(text):
    return Decimal(text.replace(",", ""))


def number_diff(chosen: str, rejected: str):
    """[(start in chosen, old text, new text)] for the numbers that differ; the text around them must be equal."""
    a, b = list(NUMBER.finditer(chosen)), list(NUMBER.finditer(rejected))
    assert len(a) == len(b)
    assert NUMBER.split(chosen) == NUMBER.split(rejected), "text other than numbers changed"
    return [(x.start(), x.group(), y.group()) for x, y in zip(a, b) if x.group() != y.group()]


def check_pair(fmt, question, pair):
    """The issue's properties; returns the old value."""
    chosen, rejected = pair["chosen"], pair["rejected"]
    assert pair["prompt"] == f"Question: {question}\nAnswer:"
    diff = number_diff(chosen, rejected)
    assert len({_value(o) for _, o, _ in diff}) == 1 and len({_value(n) for _, _, n in diff}) == 1
    old, new = _value(diff[0][1]), _value(diff[0][2])
    assert old != new
    marker = "The answer is:" if fmt == "metamath" else "####"
    final = chosen[chosen.rindex(marker):]
    assert rejected.endswith(final) and rejected.count(marker) == 1, "the final answer line changed"
    assert all(start < chosen.rindex(marker) for start, _, _ in diff)
    final_value = _value(NUMBER.search(final).group())
    question_numbers = {_value(x) for x in NUMBER.findall(question)}
    assert old not in question_numbers and old != final_value and new != final_value
    if "<<" in chosen:  # GSM8K: the annotation's result and its printed copy, together; the annotation is right
        (s1, _, _), (s2, _, _) = diff
        ann = chosen[chosen.rindex("<<", 0, s1) + 2:s1]
        assert ann.endswith("=") and eval(ann[:-1]) == old  # noqa: S307 (a hand-made test expression)
        assert chosen[s2 - 2:s2] == ">>" and len(diff) == 2
    else:
        assert len(diff) == 1
    return old


def test_gsm8k_fixture(tmp_path):
    out = tmp_path / "g.jsonl"
    summary = make_pairs("gsm8k", [str(FIX / "gsm8k.jsonl")], out, seed=0)
    rows = _read(FIX / "gsm8k.jsonl")
    # Row 3 has one step (its result is the final answer); row 5's steps give 7 (a number of the question) and
    # 49 (the final answer): both skipped and counted.
    assert summary.rows_read == 5 and summary.skipped == {m.NO_STEP: 2}
    pairs = _read(out)
    assert len(pairs) == 3
    olds = [check_pair("gsm8k", q["question"], p) for q, p in zip([rows[0], rows[1], rows[3]], pairs)]
    assert olds[0] == 72 and olds[1] in (45, 49) and olds[2] in (600, 1800)


def test_printed_copy_keeps_its_own_format():
    p = m.problem("gsm8k", _read(FIX / "gsm8k.jsonl")[3], "x")
    for seed in range(40):
        rejected, step, new = m.corrupt("gsm8k", p, random.Random(seed))
        if step.value == 1800:
            assert f"<<2400-600={new}>>{new:,}" in rejected
            break
    else:
        pytest.fail("1800 never drawn")


def test_metamath_fixture(tmp_path):
    out = tmp_path / "m.jsonl"
    rows = _read(FIX / "metamath.jsonl")
    allowed = [{36}, {24}, {30, 22}]  # rows 1, 2 and 4, by hand; row 3 has no arithmetic step, row 5 only copies
    seen = [set() for _ in allowed]
    for seed in range(12):
        summary = make_pairs("metamath", [str(FIX / "metamath.jsonl")], out, seed=seed)
        assert summary.skipped == {m.NO_STEP: 2} and summary.pairs == 3
        for k, (q, p) in enumerate(zip([rows[0], rows[1], rows[3]], _read(out))):
            seen[k].add(check_pair("metamath", q["query"], p))
    assert seen == allowed


def test_same_seed_same_bytes(tmp_path):
    src = [str(FIX / "gsm8k.jsonl")]
    make_pairs("gsm8k", src, tmp_path / "a.jsonl", seed=5)
    make_pairs("gsm8k", src, tmp_path / "b.jsonl", seed=5)
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    outs = set()
    for seed in range(6):
        make_pairs("gsm8k", src, tmp_path / "c.jsonl", seed=seed)
        outs.add((tmp_path / "c.jsonl").read_bytes())
    assert len(outs) > 1


@pytest.mark.parametrize("text, values", [
    ("So 2 + 2 = 3/4 of it.", []),                    # c continues as a fraction
    ("Then 1 + 1 = 2x here.", []),                    # c is a coefficient
    ("Then x + 2 + 3 = 5 cats.", []),                 # the tail of a longer expression
    ("We get 7 + 5 = 13 cats.", []),                  # wrong arithmetic: not a computed result
    ("First $2 \\times 3 = 6$ and 6 \\cdot 2 = 12.", [6, 12]),
    ("It is 1,000 + 250 = 1,250 m, and 10 / 3 = 3.33 h.", [1250, Decimal("3.33")]),
    ("Cost is $5 + $3 = $8 now; 4 x 2 = 8 and (2 + 3) * 4 = 20.", [8, 8, 20]),
    ("He has 12 * 3 = <<12*3=36>>36 and <<5=5>>5 left.", [36]),
])
def test_steps(text, values):
    assert [s.value for s in m.steps(text)] == values


def test_comma_format_is_kept():
    p = m.Problem("x", "A wall is 1,000 m and 250 m more. How long with 3 walls?",
                  "It is 1,000 + 250 = 1,250 m, times 3 is 1,250 * 3 = 3750.\nThe answer is: 3750")
    rejected, step, new = m.corrupt("metamath", p, random.Random(0))
    assert step.value == 1250 and f"= {new:,} m" in rejected and new != 1250


def _generator():
    spec = importlib.util.spec_from_file_location("make_gsm8k_like", ROOT / "tools" / "make_gsm8k_like.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_generator_rows_are_gsm8k_and_their_pairs_keep_every_property(tmp_path):
    gen = _generator()
    rows = gen.problems(400, 0)
    assert rows == gen.problems(400, 0) and rows != gen.problems(400, 1)
    for r in rows:
        anns = re.findall(r"<<([^=<>]+)=([^<>]+)>>(\d+)", r["answer"])
        assert anns and all(eval(e) == int(c) == int(p) for e, c, p in anns)  # noqa: S307
        assert r["answer"].endswith(f"\n#### {anns[-1][1]}")
    src = tmp_path / "train.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = make_pairs("gsm8k", [str(src)], tmp_path / "p.jsonl", seed=0)
    pairs = _read(tmp_path / "p.jsonl")
    assert summary.pairs == len(pairs) and summary.pairs + summary.skipped[m.NO_STEP] == 400
    assert summary.skipped[m.NO_STEP] > 0  # the one-step template
    by_prompt = {f"Question: {r['question']}\nAnswer:": r for r in rows}
    for p in pairs:
        check_pair("gsm8k", by_prompt[p["prompt"]]["question"], p)


def test_easy_generator_rows_are_small_and_right():
    """--level easy: one or two annotated steps whose results are right, numbers in the question from 1 to 20 (a
    'gives away' count may be 1), a non-negative final answer, every template used; the same seed, the same rows."""
    gen = _generator()
    rows = gen.problems(200, 0, "easy")
    assert rows == gen.problems(200, 0, "easy") and rows != gen.problems(200, 0)
    for r in rows:
        anns = re.findall(r"<<([^=<>]+)=([^<>]+)>>(\d+)", r["answer"])
        assert 1 <= len(anns) <= 2 and all(eval(e) == int(c) == int(p) for e, c, p in anns)  # noqa: S307
        assert r["answer"].endswith(f"\n#### {anns[-1][1]}") and int(anns[-1][1]) >= 0
        assert all(1 <= int(x) <= 20 for x in re.findall(r"\d+", r["question"])), r["question"]
    for word in (" more ", " gives ", " bags ", " buys ", " red "):  # the five templates
        assert any(word in r["question"] for r in rows), word
    assert len({r["question"] for r in rows}) > 150


def test_metamathqa_json_array_reads_like_jsonl(tmp_path):
    rows = _read(FIX / "metamath.jsonl")
    src = tmp_path / "MetaMathQA-395K.json"
    src.write_text(json.dumps(rows, indent=2))
    make_pairs("metamath", [str(src)], tmp_path / "a.jsonl", seed=2)
    make_pairs("metamath", [str(FIX / "metamath.jsonl")], tmp_path / "b.jsonl", seed=2)
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    del rows[3]["response"]
    src.write_text(json.dumps(rows))
    with pytest.raises(ValueError, match=r"MetaMathQA-395K.json:item 3: missing column 'response'"):
        make_pairs("metamath", [str(src)], tmp_path / "c.jsonl")
