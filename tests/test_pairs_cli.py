"""`jsmaug.pairs.cli.main`: make (summary line, eval split, atomic output, errors) and stats; the tools' wrappers."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from jsmaug.pairs.cli import main

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures" / "pairs"


def _lines(path):
    return [json.loads(x) for x in Path(path).read_text().splitlines()]


def test_make_with_split_eval_writes_two_files_and_a_summary(tmp_path, capsys):
    out = tmp_path / "arc.jsonl"
    assert main(["make", "--format", "arc", str(FIX / "arc.jsonl"), "--out", str(out), "--split_eval", "1"]) == 0
    line = capsys.readouterr().out.strip()
    train, held = _lines(out), _lines(tmp_path / "arc.eval.jsonl")
    assert line.startswith("4 rows read, 12 pairs written")
    assert f"{len(train)} to {out}" in line and f"{len(held)} to {tmp_path / 'arc.eval.jsonl'}" in line
    assert line.endswith("rows skipped: none")
    assert len(train) + len(held) == 12 and len({p["prompt"] for p in held}) == 1  # a question stays on one side
    assert not {p["prompt"] for p in held} & {p["prompt"] for p in train}
    assert all(set(p) == {"prompt", "chosen", "rejected"} for p in train + held)


def test_make_counts_skips_and_max_rows(tmp_path, capsys):
    out = tmp_path / "g.jsonl"
    assert main(["make", "--format", "gsm8k", str(FIX / "gsm8k.jsonl"), "--out", str(out), "--max_rows", "3"]) == 0
    assert capsys.readouterr().out.strip().endswith("rows skipped: no corruptible step 1")
    assert len(_lines(out)) == 2


def test_errors_name_file_and_line_and_leave_out_alone(tmp_path, capsys):
    src = tmp_path / "bad.jsonl"
    rows = _lines(FIX / "gsm8k.jsonl")
    del rows[1]["answer"]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    out.write_text("old\n")
    assert main(["make", "--format", "gsm8k", str(src), "--out", str(out)]) == 2
    assert f"{src}:line 2: missing column 'answer'" in capsys.readouterr().err
    assert main(["make", "--format", "gsm8k", str(FIX / "gsm8k.jsonl"), "--out", str(out), "--split_eval", "3"]) == 2
    assert "--split_eval 3: needs fewer than the 3 rows" in capsys.readouterr().err
    assert out.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "out.jsonl"]
    assert main(["make", "--format", "gsm8k", str(src), "--out", str(out), "--on_bad_row", "skip"]) == 0
    assert "bad row 1" in capsys.readouterr().out and len(_lines(out)) == 2


def test_help_names_inputs_and_an_example(capsys):
    for cmd in ("make", "stats"):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        text = capsys.readouterr().out
        assert "examples:" in text and f"jsmaug pairs {cmd}" in text
    with pytest.raises(SystemExit):
        main(["make", "--help"])
    text = capsys.readouterr().out
    assert all(k in text for k in ("answerKey", "ctx_a", "The answer is", "####", "--shots_from", "--split_eval"))


def test_stats_words_and_json(tmp_path, capsys):
    out = tmp_path / "g.jsonl"
    main(["make", "--format", "gsm8k", str(FIX / "gsm8k.jsonl"), "--out", str(out)])
    capsys.readouterr()
    assert main(["stats", str(out), "--words", "--json", str(tmp_path / "s.json")]) == 0
    text = capsys.readouterr().out
    assert text.strip().splitlines()[-1].startswith("low edit distance")
    figures = json.loads((tmp_path / "s.json").read_text())
    assert figures["pairs"] == 3 and figures["edit_distance"]["median"] == 1  # "<<..=c>>c" is one word


def test_tool_wrappers(tmp_path):
    out = tmp_path / "m.jsonl"
    r = subprocess.run([sys.executable, "tools/make_pairs.py", "--format", "metamath", str(FIX / "metamath.jsonl"),
                        "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "5 rows read, 3 pairs written" in r.stdout
    r = subprocess.run([sys.executable, "tools/pair_stats.py", str(out)], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    from jsmaug.pairs import stats

    tok = stats.load_tokenizer()
    ref = sorted(stats.levenshtein_reference(tok.encode(p["chosen"]), tok.encode(p["rejected"])) for p in _lines(out))
    assert f"edit distance (tokens): median {ref[1]}," in r.stdout and "low edit distance" in r.stdout
