"""Data: exact tokens and masks with the real tokenizer, bad rows, Grain order, shards, Parquet, TFDS."""

import json

import numpy as np
import pytest

from jsmaug.data import batches as data

TOK = data.Tokenizer()


def _write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_known_pair_exact_ids_and_masks():
    ex = data.tokenize_pair(TOK, "Hello", " world", " there", max_length=32, max_prompt_length=16)
    hello, world = TOK.encode("Hello"), TOK.encode("Hello world")[1:]
    assert ex["prompt"].tolist() == [1] + hello
    assert ex["chosen"].tolist() == world + [2] and ex["rejected"].tolist() == TOK.encode("Hello there")[1:] + [2]
    b = data.collate([ex], buckets=(8, 16))
    seq_c = [1] + hello + world + [2]
    n = len(seq_c)
    assert b["input_ids"].shape == (2, 8)
    assert b["input_ids"][0, :n].tolist() == seq_c and (b["input_ids"][0, n:] == 0).all()
    assert b["labels"][0, :n - 1].tolist() == seq_c[1:]
    # loss_mask marks exactly the positions whose label is a completion token (world..., </s>).
    want_mask = [0] * (len(hello)) + [1] * (len(world) + 1) + [0] * (8 - n + 1)
    assert b["loss_mask"][0].tolist() == want_mask
    assert int(b["loss_mask"][0].sum()) == len(world) + 1
    assert b["segment_ids"][0].tolist() == [1] * n + [0] * (8 - n)
    assert b["positions"][0, :n].tolist() == list(range(n))
    # Row 1 is the rejected completion with the same prompt.
    assert b["input_ids"][1, :len(hello) + 1].tolist() == [1] + hello


def test_prepare_counts_drops_and_reports(tmp_path):
    f = _write_jsonl(tmp_path / "d.jsonl", [
        {"prompt": "short", "chosen": "a", "rejected": "b"},
        {"prompt": "a much longer prompt " * 20, "chosen": "a", "rejected": "b"},
    ])
    cfg = data.DataConfig(max_length=12, max_prompt_length=12)
    ex, rep = data.prepare(f, cfg, TOK)
    assert len(ex) == 1 and rep.read == 2 and rep.kept == 1 and rep.dropped["prompt_too_long"] == 1
    assert "dropped: prompt_too_long=1" in str(rep)


@pytest.mark.parametrize("row,message", [
    ({"prompt": "p", "chosen": "c"}, "missing field 'rejected'"),
    ({"prompt": "p", "chosen": 3, "rejected": "r"}, "field 'chosen' must be a string"),
    ({"prompt": "p", "chosen": "  ", "rejected": "r"}, "empty completion"),
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, "identical"),
    ("{not json", "not valid JSON"),
])
def test_bad_rows_name_file_and_line(tmp_path, row, message):
    good = {"prompt": "p", "chosen": "c", "rejected": "r"}
    f = _write_jsonl(tmp_path / "bad.jsonl", [good, row, good])
    with pytest.raises(data.DataError, match=rf"bad.jsonl:line 2: .*{message}"):
        data.prepare(f, data.DataConfig(), TOK)
    ex, rep = data.prepare(f, data.DataConfig(on_bad_row="skip"), TOK)
    assert len(ex) == 2 and rep.read == 3 and sum(rep.dropped.values()) == 1
    assert "line 2" in rep.skipped_rows[0]


def test_undecodable_text_is_a_bad_row(tmp_path):
    f = tmp_path / "bin.jsonl"
    f.write_bytes(b'{"prompt": "p", "chosen": "c", "rejected": "r"}\n{"prompt": "\xff\xfe"}\n')
    with pytest.raises(data.DataError, match="bin.jsonl:line 2: text is not valid UTF-8"):
        data.prepare(f, data.DataConfig(), TOK)


def test_custom_column_names_and_parquet_equals_jsonl(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"question": f"q{i} what is {i}+1?", "good": f" {i + 1}", "bad": f" {i + 2}"} for i in range(7)]
    _write_jsonl(tmp_path / "d.jsonl", rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    cfg = data.DataConfig(prompt_key="question", chosen_key="good", rejected_key="bad")
    a, _ = data.prepare(tmp_path / "d.jsonl", cfg, TOK)
    b, _ = data.prepare(tmp_path / "d.parquet", cfg, TOK)
    assert len(a) == 7
    for x, y in zip(a, b):
        for k in ("prompt", "chosen", "rejected"):
            np.testing.assert_array_equal(x[k], y[k])


def _ex(n):
    return [{"prompt": np.array([1, 5 + i], np.int32), "chosen": np.array([7, 2], np.int32),
             "rejected": np.array([8, 9, 2], np.int32), "id": i} for i in range(n)]


def _ids(batch_ds, i):
    return [int(p["id"]) for p in batch_ds[i]]


def test_batches_deterministic_resumable_and_epoch_reshuffled():
    ex = _ex(10)
    a = data.batches(ex, 5, seed=3)
    b = data.batches(ex, 5, seed=3)
    c = data.batches(ex, 5, seed=4)
    first = [_ids(a, i) for i in range(6)]
    # "resume": a fresh pipeline asked for batch 4 gives exactly what the first run saw at 4
    assert [_ids(b, i) for i in (4, 5)] == first[4:6]
    assert first != [_ids(c, i) for i in range(6)]
    # each epoch (2 batches) covers every example once, in a new order
    assert sorted(first[0] + first[1]) == list(range(10)) == sorted(first[2] + first[3])
    assert first[0] + first[1] != first[2] + first[3]


def test_collate_pads_to_the_length_asked():
    ex = _ex(3)
    assert data.batch_length(ex, (4, 5, 8)) == 5  # prompt 2 + the longer completion 3
    assert data.collate(ex, (4, 5, 8))["input_ids"].shape == (6, 5)
    b = data.collate(ex[:1], (4, 5, 8), length=8)  # a process's share of a batch with a longer pair elsewhere
    assert b["input_ids"].shape == (2, 8) and b["input_ids"][1].tolist() == [1, 5, 8, 9, 2, 0, 0, 0]
    with pytest.raises(data.DataError, match="a pair of 5 tokens exceeds the largest bucket length 4"):
        data.batch_length(ex, (4,))


def test_sample_data_is_generated_deterministically(tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "tools/make_sample_data.py", "--check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    ex, rep = data.prepare(["data/sample/train.jsonl", "data/sample/test.jsonl"], data.DataConfig(max_length=128,
                                                                                                   max_prompt_length=64))
    assert rep.kept == rep.read == 380 and not rep.dropped


def test_tfds_builder_array_record_equals_files(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": f"Q{i}?", "chosen": f" yes {i}", "rejected": f" no {i}"} for i in range(9)]
    manual = tmp_path / "manual"
    (manual / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows[:6]), manual / "data" / "train-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist(rows[6:]), manual / "data" / "test-00000-of-00001.parquet")
    cfg = data.DataConfig(tfds_config="metamath", tfds_manual_dir=str(manual), tfds_data_dir=str(tmp_path / "tfds"))
    train, rep = data.prepare("train", cfg, TOK)
    test, _ = data.prepare("test", cfg, TOK)
    assert rep.read == 6 and len(train) == 6 and len(test) == 3
    assert list((tmp_path / "tfds").rglob("*.array_record*"))  # really stored as array_record
    _write_jsonl(tmp_path / "t.jsonl", rows[:6])
    want, _ = data.prepare(tmp_path / "t.jsonl", data.DataConfig(), TOK)
    got = sorted(train, key=lambda e: e["prompt"].tolist())
    want = sorted(want, key=lambda e: e["prompt"].tolist())
    for x, y in zip(got, want):
        for k in ("prompt", "chosen", "rejected"):
            np.testing.assert_array_equal(x[k], y[k])
    # A split that is not there, and a malformed file, fail clearly.
    with pytest.raises(data.DataError, match="no split 'validation'"):
        data.prepare("validation", cfg, TOK)
    bad = tmp_path / "bad"
    bad.mkdir()
    _write_jsonl(bad / "train.jsonl", [{"prompt": "p", "chosen": "c"}])
    with pytest.raises(data.DataError, match=r"train.jsonl:line 1: missing field 'rejected'"):
        data.prepare("train", data.DataConfig(tfds_config="generic", tfds_manual_dir=str(bad),
                                              tfds_data_dir=str(tmp_path / "tfds2")), TOK)


def test_multiple_choice_questions_are_not_in_the_training_data():
    train = [json.loads(x)["prompt"] for x in open("data/sample/train.jsonl")]
    test = [json.loads(x)["prompt"] for x in open("data/sample/test.jsonl")]
    mc = [json.loads(x)["query"] for x in open("data/sample/mc.jsonl")]
    assert len(mc) == 20
    seen = set(train) | set(test)
    assert not [q for q in mc if q in seen or q.split("\n")[0] in "\n".join(seen)]
