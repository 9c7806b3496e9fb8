"""Packed pairs: the exact layout; attention never leaks across segments; packed equals padded in losses,
gradients, MoE statistics and training steps (DPO, float32; a mesh and micro-batches too)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jsmaug.data import batches as data, packing
from jsmaug.models import config as cfg_lib, decoder as model
from jsmaug.parallel import sharding as shd
from jsmaug.train import plan as plan_lib, step
from jsmaug.train.config import LossSection

CONF = cfg_lib.tiny(vocab_size=64, num_key_value_heads=2, router_aux_loss_coef=0.02, attention_block_size=8)
LOSS = LossSection(type="dpo", beta=0.3)
BUCKETS = (32, 64)


def _pairs(n, seed=0):
    """Pairs of very different lengths (4 to ~45 tokens per sequence), with their dataset index."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        p = rng.integers(3, 64, rng.integers(1, 12))
        c = rng.integers(3, 64, int(rng.choice([2, 3, 30]) + rng.integers(0, 4)))
        r = rng.integers(3, 64, int(rng.choice([2, 4, 28]) + rng.integers(0, 4)))
        out.append({"prompt": np.r_[1, p].astype(np.int32), "chosen": np.r_[c, 2].astype(np.int32),
                    "rejected": np.r_[r, 2].astype(np.int32), "index": np.int32(i)})
    return out


def test_first_fit_and_the_packed_arrays():
    lengths = [5, 3, 8, 2, 6]
    assert packing.first_fit(lengths, 8) == [[0, 1], [2], [3, 4]]
    with pytest.raises(data.DataError, match="does not fit a packed row of 8"):
        packing.first_fit([9], 8)
    pairs = [{"prompt": np.array([1, 5], np.int32), "chosen": np.array([6, 2], np.int32),
              "rejected": np.array([7, 8, 2], np.int32), "index": 0},
             {"prompt": np.array([1, 9, 9], np.int32), "chosen": np.array([3, 2], np.int32),
              "rejected": np.array([4, 2], np.int32), "index": 1}]
    layout = packing.plan(pairs, micro=1, shards=1, buckets=(10, 16), row_step=0)
    # row_step=0: rows of the bucket length. Sequences 4, 5, 5, 5 tokens into rows of 10: [p0c, p0r], [p1c, p1r]
    assert layout.row_length == 10 and layout.rows == ((((0, True), (0, False)), ((1, True), (1, False))),)
    rows = packing.materialize(pairs, layout, [0])
    assert rows["input_ids"][0, 0].tolist() == [1, 5, 6, 2, 1, 5, 7, 8, 2, 0]
    assert rows["segment_ids"][0, 0].tolist() == [1, 1, 1, 1, 2, 2, 2, 2, 2, 0]
    assert rows["positions"][0, 0].tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 4, 0]
    assert rows["labels"][0, 0].tolist() == [5, 6, 2, 0, 5, 7, 8, 2, 0, 0]
    assert rows["loss_mask"][0, 0].tolist() == [0, 1, 1, 0, 0, 1, 1, 1, 0, 0]
    # Sequence ids: pair q's chosen is q, its rejected Bm + q (Bm = 2 pairs in the micro-batch).
    assert rows["sequence_ids"][0, 0].tolist()[:9] == [0, 0, 0, 0, 2, 2, 2, 2, 2]
    assert rows["sequence_ids"][0, 1].tolist()[:10] == [1] * 5 + [3] * 5
    # Two micro-batches x two shards: four groups of one pair each; each group's sequences stay in its rows.
    four = _pairs(4)
    layout = packing.plan(four, micro=2, shards=2, buckets=BUCKETS)
    assert len(layout.rows) == 4 and all({j for row in g for j, _ in row} == {i} for i, g in enumerate(layout.rows))
    assert packing.row_counts(8) == (1, 2, 3, 4, 5, 6, 7, 8) and packing.row_counts(20)[8:] == (9, 11, 13, 15, 17, 20)


def test_the_row_length_ladder_picks_the_fewest_slots():
    lengths = [5, 3, 8, 2, 6]
    # longest first: 8 | 6+2 | 5+3; each row's indices ascending.
    assert packing.first_fit_decreasing(lengths, 8) == [[2], [3, 4], [0, 1]]
    rng = np.random.default_rng(0)
    seq = lambda n: rng.integers(3, 60, n).astype(np.int32)  # noqa: E731
    pairs = [{"prompt": np.r_[1, seq(2)].astype(np.int32), "chosen": seq(2), "rejected": seq(2), "index": i}
             for i in range(2)]  # four sequences of 5 tokens; bucket 10, so the ladder runs 8, 12, 16, 20
    # slots: 8 -> 4 rows (32), 12 -> 2 rows (24), 16 -> 2 rows (32), 20 -> 1 row (20): one row of 20.
    layout = packing.plan(pairs, micro=1, shards=1, buckets=(10, 16), row_step=4)
    assert (layout.row_length, layout.rows_per_group) == (20, 1)
    assert layout.rows == ((((0, True), (0, False), (1, True), (1, False)),),)
    rows = packing.materialize(pairs, layout, [0])
    assert rows["segment_ids"][0, 0].tolist() == [1] * 5 + [2] * 5 + [3] * 5 + [4] * 5
    assert rows["sequence_ids"][0, 0].tolist() == [0] * 5 + [2] * 5 + [1] * 5 + [3] * 5
    # A ladder step that the longest sequence (5) rounds up to: rows of at least 5 tokens, in steps of 3.
    assert packing.plan(pairs, micro=1, shards=1, buckets=(10, 16), row_step=3).row_length % 3 == 0
    # Every sequence exactly once, no row over its length, on long-tailed pairs in four groups.
    many = _pairs(16, seed=3)
    lay = packing.plan(many, micro=2, shards=2, buckets=BUCKETS)
    bucket = data.batch_length(many, BUCKETS)  # 64: a ladder of multiples of 64 // 8
    assert lay.row_length % (bucket // 8) == 0 and lay.row_length <= 2 * bucket
    placed = sorted(s for g in lay.rows for row in g for s in row)
    assert placed == sorted((j, c) for j in range(16) for c in (True, False))
    for g in lay.rows:
        assert len(g) <= lay.rows_per_group
        assert all(sum(packing.sequence_lengths(many[j])[0 if c else 1] for j, c in row) <= lay.row_length for row in g)


def _padded_and_packed(pairs, micro=1):
    padded = data.collate(pairs, BUCKETS)
    mesh = shd.make_mesh(shd.MeshConfig(data=1), CONF, jax.devices()[:1])
    packed = plan_lib.place_packed(pairs, None, micro, mesh, shd.MeshConfig(data=1), data.DataConfig(train_path="x"),
                                   BUCKETS)
    return padded, jax.tree.map(np.asarray, packed)


def policy_reference_and_losses(conf, loss):
    """(params, a reference away from the policy, a jitted fn (params, ref, batch) -> [((loss, metrics), grads)] of
    `loss` and of LD-DPO + WPO + SFT, both in one program per layout: they share its forward)."""
    params = model.init_params(conf, jax.random.key(0))
    ref = jax.tree.map(lambda x: x + 0.01 * jnp.sin(jnp.arange(x.size).reshape(x.shape) * 1.3), params)
    losses = (loss, LossSection(type=("sigmoid", "sft"), ld_alpha=0.5, wpo=True))

    @jax.jit
    def both(p, r, batch):
        return [jax.value_and_grad(functools.partial(step.loss_and_metrics, config=conf, loss_cfg=lo),
                                   has_aux=True)(p, r, batch) for lo in losses]
    return params, ref, both


def test_packed_equals_padded_loss_gradients_and_moe_statistics():
    pairs = _pairs(8)
    padded, packed = _padded_and_packed(pairs)
    assert packed["input_ids"].shape[1] < padded["input_ids"].shape[0]  # fewer rows: less padding
    params, ref, both = policy_reference_and_losses(CONF, LOSS)
    for ((l_pad, m_pad), g_pad), ((l_pk, m_pk), g_pk) in zip(both(params, ref, padded),
                                                             both(params, ref, step.unpair(packed))):
        np.testing.assert_allclose(l_pk, l_pad, rtol=1e-5)
        for k in ("logps/chosen", "logps/rejected", "rewards/margins", "moe/aux_loss", "moe/expert_load", "tokens"):
            # rewards/margins is beta x a difference of ~-100-nat log-probs: float32 resolves it to ~1e-5 absolute
            # (the ladder's longest-first rows sum in another order than the padded rows).
            atol = 1e-5 if k == "rewards/margins" else 1e-6
            np.testing.assert_allclose(m_pk[k], m_pad[k], rtol=1e-5, atol=atol, err_msg=k)
        assert float(m_pk["padding_fraction"]) < float(m_pad["padding_fraction"])
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g_pk, g_pad)


@pytest.mark.parametrize("impl", ["chunked", "xla"])
def test_a_packed_row_attends_only_within_each_segment(impl):
    """Change every token of one segment: the hidden states of the other segments of the row stay exactly put
    (a mask that leaked across segments would move them)."""
    conf = CONF.replace(attention_impl=impl)
    params = model.init_params(conf, jax.random.key(1))
    rng = np.random.default_rng(2)
    seg = np.array([[1] * 9 + [2] * 14 + [3] * 7 + [0] * 2], np.int32)  # blocks of 8 straddle the boundaries
    pos = np.concatenate([np.arange(9), np.arange(14), np.arange(7), [0, 0]])[None].astype(np.int32)
    ids = rng.integers(3, 64, seg.shape).astype(np.int32)
    other = ids.copy()
    other[seg == 2] = rng.integers(3, 64, int((seg == 2).sum()))
    h = lambda x: np.asarray(model.forward_hidden(conf, params, x, segment_ids=seg, positions=pos)[0])  # noqa: E731
    a, b = h(ids), h(other)
    keep = (seg[0] == 1) | (seg[0] == 3)
    np.testing.assert_array_equal(a[0, keep], b[0, keep])
    assert np.abs(a[0, seg[0] == 2] - b[0, seg[0] == 2]).max() > 1e-3
    # Each segment alone (positions from 0, as a row of its own) gives the same states.
    third = slice(23, 30)
    alone = np.asarray(model.forward_hidden(conf, params, ids[:, third], segment_ids=np.ones((1, 7), np.int32),
                                            positions=pos[:, third])[0])
    np.testing.assert_allclose(a[0, third], alone[0], rtol=1e-5, atol=1e-5)


def _train(batches, mesh_cfg, devices, micro=1, packed=False, steps=2):
    mesh = shd.make_mesh(mesh_cfg, CONF, devices)
    param_sh = shd.param_shardings(CONF, mesh, mesh_cfg)
    params = jax.jit(lambda k: model.init_params(CONF, k), out_shardings=param_sh)(jax.random.key(0))
    ref = jax.jit(lambda p: jax.tree.map(lambda x: x * 1.01, p), out_shardings=param_sh)(params)
    opt = optax.sgd(0.5, momentum=0.9)
    state_sh = step.state_shardings(opt, params, param_sh, mesh)
    state = step.init_state(opt, params, state_sh, seed=0)
    data_cfg = data.DataConfig(train_path="x", packing=packed)
    place = (functools.partial(plan_lib.place_packed, micro=micro, mesh=mesh, mesh_cfg=mesh_cfg, data_cfg=data_cfg,
                               buckets=BUCKETS) if packed
             else lambda p, _: shd.put_batch(data.collate(p, BUCKETS), mesh, mesh_cfg))
    out, fns = [], {}
    for pairs in batches[:steps]:
        batch = place(pairs, None)
        batch_sh = jax.tree.map(lambda x: x.sharding, batch)
        key = jax.tree.map(lambda x: x.shape, batch)  # one jitted step per batch shape (the same pairs: one)
        fn = fns.setdefault(str(key), step.jit_train_step(state_sh, batch_sh, param_sh, config=CONF, loss_cfg=LOSS,
                                                           optimizer=opt, micro_batches=micro))
        state, m = fn(state, batch, ref, jnp.asarray(False))
        out.append({k: np.asarray(v) for k, v in m.items()})
    return state, out


def test_packed_steps_equal_padded_steps_on_a_mesh_with_micro_batches():
    mesh_sizes, micro = dict(data=2, expert=2), 2  # 8 pairs: 2 micro-batches x 4 data shards of one pair each
    # The same pairs twice: one batch shape, so one compile per side; step 2 still starts from step 1's params and
    # momentum (the state carried across steps is what the second step checks).
    batches = [_pairs(8, seed=3)] * 2
    mesh_cfg = shd.MeshConfig(**mesh_sizes)
    devices = jax.devices()[:int(np.prod(list(mesh_sizes.values())))]
    s_pad, m_pad = _train(batches, mesh_cfg, devices, micro)
    s_pk, m_pk = _train(batches, mesh_cfg, devices, micro, packed=True)
    for a, b in zip(m_pad, m_pk):
        # rewards/margins is beta x a difference of ~-100-nat log-probs: float32 resolves it to ~1e-5 absolute.
        for k in ("loss", "logps/chosen", "rewards/margins", "grad_norm", "moe/aux_loss", "moe/expert_load", "tokens"):
            np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-5, err_msg=k)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6),
                 s_pad.params, s_pk.params)


def test_padding_fractions_report_both():
    batches = [_pairs(8, seed=s) for s in range(3)]
    padded, packed = packing.padding_fractions(batches, micro=1, shards=1, buckets=BUCKETS)
    assert 0 <= packed < padded < 1
    # The ladder (the default) wastes less than rows of the bucket length on these pairs.
    _, bucket_rows = packing.padding_fractions(batches, micro=1, shards=1, buckets=BUCKETS, row_step=0)
    assert packed < bucket_rows


def _mild_steps(steps=40, per_step=8):
    from jsmaug.perf.packing_bench import mild_pairs

    pairs = mild_pairs(160, 512, seed=1)
    ds = data.batches(pairs, per_step, seed=0)
    return [ds[i] for i in range(steps)], max(max(packing.sequence_lengths(p)) for p in pairs)


def test_one_row_length_per_run_bounds_the_compiled_shapes():
    """Per-step ladder lengths give a new (rows, length) shape, so a new compile, on most of a run's first steps;
    the run's one length keeps the shapes to a few row counts, at no more than 12% padding on mild data."""
    steps, longest = _mild_steps()
    buckets = data.power_of_two_buckets(512)
    step = packing.run_row_step("cpu")
    length = packing.run_row_length(steps[:20], micro=1, shards=1, buckets=buckets, longest=longest, row_step=step)
    assert length % step == 0 and length >= longest
    per_step = {(p.rows_per_group, p.row_length) for p in
                (packing.plan(b, micro=1, shards=1, buckets=buckets) for b in steps)}
    run = [packing.plan(b, micro=1, shards=1, buckets=buckets, run_length=length) for b in steps]
    assert {p.row_length for p in run} == {length}
    assert len({p.rows_per_group for p in run}) <= 4 < len(per_step)
    _, packed = packing.padding_fractions(steps, micro=1, shards=1, buckets=buckets, run_length=length)
    assert packed <= 0.12
    # The chosen length needs no more slots over the sample than any other length of the ladder.
    def slots(n):
        return sum(packing.plan(b, micro=1, shards=1, buckets=buckets, run_length=n).slots for b in steps[:20])
    assert all(slots(length) <= slots(n) for n in range(length - 64, length + 129, step) if n >= longest)
    assert packing.run_row_step("tpu") == 128


def test_a_sequence_longer_than_the_run_length_takes_the_ladder():
    pairs = _pairs(8)
    longest = max(max(packing.sequence_lengths(p)) for p in pairs)
    lay = packing.plan(pairs, micro=1, shards=1, buckets=BUCKETS, run_length=longest - 1)
    assert lay.row_length >= longest
    assert lay == packing.plan(pairs, micro=1, shards=1, buckets=BUCKETS)
