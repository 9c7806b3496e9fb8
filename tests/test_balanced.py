"""Steps of near-equal tokens (jsmaug.data.balanced): each epoch uses every pair once, each packed group takes one
pair of every length stratum (checked against ranks computed here), steps are a pure function of the step number,
and on mild pairs a packed run's one shape leaves far less padding than with a plain shuffle."""

import numpy as np
import pytest

from jsmaug.data import balanced, batches as data, packing
from jsmaug.perf.packing_bench import mild_pairs


def _pairs(n, seed=0):
    """Pairs of distinct token counts (so strata are unambiguous), with their dataset index."""
    rng = np.random.default_rng(seed)
    sizes = rng.permutation(n) + 1
    return [{"prompt": np.ones(1 + s % 3, np.int32), "chosen": np.ones(s, np.int32),
             "rejected": np.ones(2, np.int32), "index": np.int32(i)} for i, s in enumerate(10 * sizes)]


@pytest.mark.parametrize("n,batch,groups,shared", [(40, 8, 1, False), (43, 8, 2, False), (36, 6, 3, False),
                                                    (16, 8, 4, False), (40, 8, 2, True)])
def test_every_group_takes_one_pair_of_each_length_stratum(n, batch, groups, shared):
    pairs = _pairs(n)
    ds = balanced.BalancedBatches(pairs, batch, seed=3, groups=groups, shared=shared)
    m, per = n // batch, batch // groups
    for e in range(2):
        steps = [ds[e * m + k] for k in range(m)]
        used = [int(p["index"]) for s in steps for p in s]
        assert len(used) == len(set(used)) == m * batch  # each pair at most once an epoch; n mod batch sit out
        # Strata from the used pairs' token counts, ranked here (longest first).
        tokens = packing.unit_length if shared else (lambda p: sum(packing.sequence_lengths(p)))
        ranked = sorted(used, key=lambda i: -tokens(pairs[i]))
        stratum = {i: r // (m * groups) for r, i in enumerate(ranked)}
        for s in steps:
            for g in range(groups):
                assert sorted(stratum[int(p["index"])] for p in s[g * per:(g + 1) * per]) == list(range(per))
    assert [int(p["index"]) for p in ds[0]] != [int(p["index"]) for p in ds[m]]  # epochs differ


def test_steps_are_a_pure_function_of_the_step_number():
    pairs = _pairs(50)
    a, b = balanced.BalancedBatches(pairs, 8, seed=7), balanced.BalancedBatches(pairs, 8, seed=7)
    ids = lambda ds, i: [int(p["index"]) for p in ds[i]]  # noqa: E731
    first = {i: ids(a, i) for i in range(14)}  # in order, as a run takes them
    assert all(ids(b, i) == first[i] for i in [13, 0, 6, 7, 12, 1])  # across epochs, out of order: a resume
    c = balanced.BalancedBatches(pairs, 8, seed=8)
    assert any(ids(c, i) != first[i] for i in range(6))
    with pytest.raises(IndexError, match="step index -1"):
        a[-1]


def test_balanced_steps_pack_into_one_shape_with_little_padding():
    """The bench's mild pairs (8 a step): a plain shuffle's steps hold 1,630-2,586 tokens, so the run's one shape
    (data.packing_compile_steps=35) leaves 18.6% of the slots empty; balanced steps hold 2,110-2,262, and one
    shape leaves 7.3%."""
    pairs = mild_pairs(160, 512, seed=1)
    buckets = data.power_of_two_buckets(512)
    longest = max(max(packing.sequence_lengths(p)) for p in pairs)
    got = {}
    for name, ds in (("shuffled", data.batches(pairs, 8, seed=0)),
                     ("balanced", balanced.BalancedBatches(pairs, 8, seed=0))):
        steps = [ds[i] for i in range(40)]
        tokens = [sum(sum(packing.sequence_lengths(p)) for p in s) for s in steps]
        lay = packing.run_layout(steps, micro=1, shards=1, buckets=buckets, longest=longest, row_step=8,
                                 compile_steps=35.0)
        got[name] = (np.std(tokens), lay, packing.padding_fractions(steps, micro=1, shards=1, buckets=buckets,
                                                                    run_length=lay)[1])
    assert got["balanced"][0] < got["shuffled"][0] / 4
    assert len(got["balanced"][1].counts) == 1 and got["balanced"][2] <= 0.10 < 0.15 <= got["shuffled"][2]


def test_the_config_switch_and_its_errors():
    def Cfg(packing, balanced_steps):  # noqa: N802
        return data.DataConfig(train_path="x", packing=packing, balanced_steps=balanced_steps)
    assert [balanced.is_balanced(Cfg(p, b)) for p, b in
            [(True, None), (False, None), (True, False), (False, True)]] == [True, False, False, True]
    pairs = _pairs(20)
    assert isinstance(balanced.train_batches(pairs, Cfg(True, None), 8, seed=0), balanced.BalancedBatches)
    plain = balanced.train_batches(pairs, Cfg(False, None), 8, seed=0)
    assert [int(p["index"]) for p in plain[0]] == [int(p["index"]) for p in data.batches(pairs, 8, seed=0)[0]]
    assert balanced.BalancedBatches(pairs, 8, seed=0, groups=3).groups == 1  # 3 groups do not split 8 pairs
    p = pairs[3]  # with shared prompts a pair's tokens are its unit's (the prompt once)
    plain_tokens, shared_tokens = (balanced.BalancedBatches(pairs, 8, seed=0, shared=s).tokens[3]
                                   for s in (False, True))
    assert shared_tokens == packing.unit_length(p) == plain_tokens - len(p["prompt"]) + 1
    with pytest.raises(data.DataError, match="5 pairs, fewer than one step's 8"):
        balanced.BalancedBatches(pairs[:5], 8, seed=0)
