"""A packed run's layout (`packing.run_layout`): the row length and row counts of least work, a compile counted
as `compile_steps` steps of real tokens, against a brute force over every length and every set of counts; what
it gives on mild data; `packing.plan` with a `RunLayout`; and the run's compilation cache setting."""

import itertools

import numpy as np
import pytest

from jsmaug.data import batches as data, packing
from jsmaug.train import programs

BUCKETS = (32, 64)


def _pairs(n, seed):
    """Pairs of 4 to ~45 tokens per sequence: several row counts at most lengths."""
    rng = np.random.default_rng(seed)
    ids = lambda k: rng.integers(3, 64, k).astype(np.int32)  # noqa: E731
    return [{"prompt": np.r_[1, ids(rng.integers(1, 12))].astype(np.int32),
             "chosen": np.r_[ids(int(rng.choice([2, 3, 30]) + rng.integers(0, 4))), 2].astype(np.int32),
             "rejected": np.r_[ids(int(rng.choice([2, 4, 28]) + rng.integers(0, 4))), 2].astype(np.int32),
             "index": np.int32(i)} for i in range(n)]


def _brute_force(batches, *, micro, lengths, steps, compile_steps):
    """Every length, every set of row counts drawn from the needs that holds the largest: the least work
    (slots over `steps` steps + compile_steps x mean real tokens per count), then fewer counts, then shorter."""
    groups = micro
    real = np.mean([sum(sum(packing.sequence_lengths(p)) for p in b) for b in batches])
    best = None
    for length in lengths:
        needs = []
        for b in batches:
            per = len(b) // groups
            seqs = [[n for j in range(g * per, (g + 1) * per) for n in packing.sequence_lengths(b[j])]
                    for g in range(groups)]
            needs.append(max(len(packing.first_fit_decreasing(s, length)) for s in seqs))
        distinct = sorted(set(needs))
        for k in range(len(distinct)):
            for rest in itertools.combinations(distinct[:-1], k):
                counts = rest + (distinct[-1],)
                slots = sum(groups * length * min(c for c in counts if c >= n) for n in needs)
                cost = slots * steps / len(batches) + compile_steps * real * len(counts)
                key = (round(cost, 6), len(counts), length)
                if best is None or key < best[0]:
                    best = (key, packing.RunLayout(length, counts))
    return best[1]


@pytest.mark.parametrize("compile_steps,steps", [(0.0, 6), (1.0, 6), (1.0, 600), (4.0, 60), (1e6, 6)])
def test_the_run_layout_is_the_least_work_of_every_length_and_set_of_counts(compile_steps, steps):
    batches = [_pairs(8, seed=s) for s in range(6)]
    longest = max(max(packing.sequence_lengths(p)) for b in batches for p in b)
    got = packing.run_layout(batches, micro=2, shards=1, buckets=BUCKETS, longest=longest, row_step=4,
                             compile_steps=compile_steps, steps=steps)
    top = 2 * max(data.batch_length(b, BUCKETS) for b in batches)
    lengths = range(-(-longest // 4) * 4, top + 1, 4)
    assert got == _brute_force(batches, micro=2, lengths=lengths, steps=steps, compile_steps=compile_steps)
    if compile_steps >= 1e6:
        assert len(got.counts) == 1  # a compile costs more than any padding saves


def test_a_short_run_takes_fewer_shapes_than_a_long_one_on_mild_data():
    """The mild pairs (8 a step): one row length per run, and the number of row counts grows with the run's
    length, since a compile (the default: 35 steps' work) pays off only over enough steps; a long run's layout
    wastes at most 12% of its slots, and no layout needs more token slots than padding."""
    from jsmaug.perf.packing_bench import mild_pairs

    pairs = mild_pairs(160, 512, seed=1)
    ds = data.batches(pairs, 8, seed=0)
    steps = [ds[i] for i in range(40)]
    longest = max(max(packing.sequence_lengths(p)) for p in pairs)
    buckets = data.power_of_two_buckets(512)
    kw = dict(micro=1, shards=1, buckets=buckets, longest=longest, row_step=8, max_length=512,
              compile_steps=data.DataConfig().packing_compile_steps)
    short, long_ = (packing.run_layout(steps, steps=n, **kw) for n in (40, 4000))
    assert len(short.counts) < len(long_.counts) and short.length <= 512 and long_.length <= 512
    padded, packed = packing.padding_fractions(steps, micro=1, shards=1, buckets=buckets, run_length=long_)
    assert packed <= 0.12 < padded
    for lay in (short, long_):
        plans = [packing.plan(b, micro=1, shards=1, buckets=buckets, run_length=lay) for b in steps]
        assert {p.rows_per_group for p in plans} == set(lay.counts) and {p.row_length for p in plans} == {lay.length}
        assert sum(p.slots for p in plans) < sum(2 * 8 * data.batch_length(b, buckets) for b in steps)


def test_plan_with_a_run_layout_takes_the_smallest_count_that_holds_the_step():
    pairs = _pairs(8, seed=3)
    longest = max(packing.sequence_lengths(p)[k] for p in pairs for k in (0, 1))
    need = len(packing.first_fit_decreasing([n for p in pairs for n in packing.sequence_lengths(p)], 64))
    for counts, want in (((need,), need), ((need - 1, need + 2), need + 2), ((1,), need)):
        lay = packing.plan(pairs, micro=1, shards=1, buckets=BUCKETS, run_length=packing.RunLayout(64, counts))
        assert (lay.row_length, lay.rows_per_group) == (64, want)  # past every count: row_counts gives `need`
        assert sorted(s for g in lay.rows for row in g for s in row) == sorted(
            (j, c) for j in range(8) for c in (True, False))
    # A sequence longer than the run's rows: this step takes the ladder's length, as without a run length.
    short = packing.RunLayout(longest - 1, (1,))
    assert packing.plan(pairs, micro=1, shards=1, buckets=BUCKETS, run_length=short) == packing.plan(
        pairs, micro=1, shards=1, buckets=BUCKETS)


def test_the_run_layout_keeps_to_max_length_unless_a_sequence_needs_more():
    batches = [_pairs(8, seed=s) for s in range(3)]
    longest = max(max(packing.sequence_lengths(p)) for b in batches for p in b)
    kw = dict(micro=1, shards=1, buckets=BUCKETS, longest=longest, row_step=4)
    assert packing.run_layout(batches, max_length=longest + 4, **kw).length <= longest + 4
    assert packing.run_layout(batches, max_length=longest - 10, **kw).length == -(-longest // 4) * 4


def test_the_compilation_cache_setting():
    assert programs.cache_dir(None, {}) == (None, "off (compilation_cache: null)")
    assert programs.cache_dir("off", {})[0] is None
    assert programs.cache_dir("~/xla", {})[0].endswith("/xla") and "~" not in programs.cache_dir("~/xla", {})[0]
    # auto: JAX's own setting first (the tests' runs give theirs), else $XDG_CACHE_HOME, else ~/.cache.
    assert programs.cache_dir("auto", {"JAX_COMPILATION_CACHE_DIR": "/a"}, "/b")[0] == "/a"
    assert programs.cache_dir("auto", {}, "/b")[0] == "/b"
    assert programs.cache_dir("auto", {"XDG_CACHE_HOME": "/x"})[0] == "/x/jsmaug/jax"
    home = programs.cache_dir("auto", {})[0]
    assert home.endswith("/.cache/jsmaug/jax") and not home.startswith("~")
    # JSMAUG_COMPILATION_CACHE replaces the run's setting (the suite's own processes run with it off).
    import jax
    line = programs.configure_cache("auto", {"JSMAUG_COMPILATION_CACHE": "off"})
    assert "off" in line and not jax.config.jax_enable_compilation_cache


def test_packed_rows_keep_the_padded_rows_attention_path_on_cpu():
    """On CPU `auto` attention runs rows of up to attention_block_size through `xla` and longer rows through
    `chunked` (1.6x the work per slot); the run's packed rows stay on the padded rows' path."""
    import jax

    from jsmaug.models import config as cfg_lib
    from jsmaug.perf.bench import step_run_config
    from jsmaug.train import plan as plan_lib

    config = cfg_lib.tiny(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                          num_key_value_heads=2, attention_block_size=64)
    plan = plan_lib.plan(step_run_config(config, "dpo", 128), jax.devices()[:1], config=config)
    assert programs.attention_row_cap(plan, 32, 8) is None  # 32..64: all `xla`
    assert programs.attention_row_cap(plan, 48, 8) == 64  # 72..96 would be `chunked`
    assert programs.attention_row_cap(plan, 128, 8) is None  # `chunked` already, and so is every longer row
