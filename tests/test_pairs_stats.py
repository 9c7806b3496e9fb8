"""Token edit distance (batched NumPy DP) against the plain dynamic programme, and the stats' reading."""

import json
import random

import numpy as np
import pytest

from jsmaug.pairs import stats


def _random_pairs(seed, n=400):
    rng = random.Random(seed)
    a, b = [], []
    for _ in range(n):
        vocab = rng.choice([2, 4, 32000])
        x = [rng.randrange(vocab) for _ in range(rng.randint(0, 40))]
        y = [rng.randrange(vocab) for _ in range(rng.randint(0, 40))]
        if rng.random() < 0.3:  # a shared prefix and suffix, and a few edits in between
            head, tail = [rng.randrange(vocab) for _ in range(rng.randint(0, 30))], [rng.randrange(vocab)
                                                                                     for _ in range(rng.randint(0, 9))]
            x, y = head + x[:rng.randint(0, 3)] + tail, head + y[:rng.randint(0, 3)] + tail
        a.append(x)
        b.append(y)
    return a, b


@pytest.mark.parametrize("seed, batch", [(0, 1024), (1, 7), (2, 1)])
def test_edit_distance_equals_the_plain_dp(seed, batch):
    a, b = _random_pairs(seed)
    dist, prefix, suffix = stats.edit_distances(a, b, batch=batch)
    assert dist.tolist() == [stats.levenshtein_reference(x, y) for x, y in zip(a, b)]
    for x, y, p, s in zip(a, b, prefix, suffix):
        n = 0
        while n < min(len(x), len(y)) and x[n] == y[n]:
            n += 1
        assert p == n
        assert s <= min(len(x), len(y)) - p and (s == 0 or x[len(x) - s:] == y[len(y) - s:])


def test_reference_on_known_cases():
    assert stats.levenshtein_reference("kitten", "sitting") == 3
    kitten, sitting = [ord(c) for c in "kitten"], [ord(c) for c in "sitting"]
    assert stats.edit_distances([kitten, [], [1, 2]], [sitting, [5, 6], []])[0].tolist() == [3, 2, 2]


def test_word_stats_and_readings():
    chosen = ["a b c d e f", "x y z", "p q r s", "one two"]
    rejected = ["a b X d e f", "x y", "p Q R s", "one two three four five six"]
    s = stats.pair_stats(chosen, rejected, None)
    assert s["pairs"] == 4
    # distances 1, 1, 2, 4 -> median 1.5; all under 5
    assert s["edit_distance"]["median"] == 1.5 and s["edit_distance"]["share_under_5"] == 1.0
    assert s["edit_distance"]["p10"] == pytest.approx(np.percentile([1, 1, 2, 4], 10))
    assert s["shared_prefix_share"]["mean"] == pytest.approx((2 / 6 + 2 / 3 + 1 / 4 + 1) / 4)
    assert s["reading"] == stats.LOW_READING
    far = stats.pair_stats(["the cat sat on the mat today"] * 3, ["a dog ran in a park at noon"] * 3, None)
    assert far["edit_distance"]["median"] == 8 and far["reading"] == stats.HIGH_READING  # 7 swaps, 1 insert
    assert far["reading"].startswith("high edit distance")
    assert "DPOP keeps them" in stats.report(s)


def test_tokenizer_ids_are_the_tokenizers(tmp_path):
    tok = stats.load_tokenizer()
    texts = [" 12 * 6 = <<12*6=72>>72 loaves", "ends here</s>", " gravity"]
    assert stats.encode_all(tok, texts) == [tok.encode(t) for t in texts]
    s = stats.pair_stats([" 12 * 6 = 72 loaves"], [" 12 * 6 = 73 loaves"], tok)
    assert s["edit_distance"]["median"] == 1  # digits are single tokens in Mixtral's vocabulary
    assert s["unit"].startswith("tokens")


def test_read_pairs_errors_name_the_line(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n" + json.dumps({"chosen": "a"}))
    with pytest.raises(ValueError, match=rf"{f}:line 2: needs 'chosen' and 'rejected'"):
        stats.read_pairs(str(f))
    assert stats.read_pairs(str(f), on_bad_row="skip") == (["a"], ["b"])
