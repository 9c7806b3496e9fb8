"""Shared prompts (`data.share_prompt`): each pair packed once as prompt, chosen branch, rejected branch. The exact
layout; each branch sees its prompt and never the other branch (xla and chunked); the log-probs, losses and
gradients equal the padded batch's (DPO with a reference away from the policy, and LD-DPO + WPO + SFT, whose token
weights count each branch from its own start); the config's refusals."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jsmaug.data import batches as data, packing
from jsmaug.errors import ConfigError
from jsmaug.models import attention, config as cfg_lib, decoder as model
from jsmaug.parallel import sharding as shd
from jsmaug.segments import SHARED, shared_id
from jsmaug.train import plan as plan_lib, step
from jsmaug.train.config import LossSection, RunConfig
from tests.test_packing import _pairs, policy_reference_and_losses  # pairs of very different lengths

CONF = cfg_lib.tiny(vocab_size=64, num_key_value_heads=2, router_aux_loss_coef=0.0, attention_block_size=8,
                    shared_prompt_masks=True)  # what a run with data.share_prompt sets
BUCKETS = (32, 64)


def test_a_unit_is_laid_out_prompt_then_both_branches():
    pair = {"prompt": np.array([1, 5, 6], np.int32), "chosen": np.array([7, 8], np.int32),
            "rejected": np.array([9, 2], np.int32), "index": np.int32(0)}
    other = {"prompt": np.array([1], np.int32), "chosen": np.array([3], np.int32),
             "rejected": np.array([4, 4], np.int32), "index": np.int32(1)}
    assert packing.unit_length(pair) == 8 and packing.item_lengths(pair, True) == (8,)
    lay = packing.plan([pair, other], micro=1, shards=1, buckets=(16,), row_length=16, shared=True)
    assert lay.rows == ((((0, None), (1, None)),),)
    rows = {k: v[0, 0].tolist() for k, v in packing.materialize([pair, other], lay, [0]).items()}
    u1, u2 = (lambda b: shared_id(1, b)), (lambda b: shared_id(2, b))  # noqa: E731
    #                 prompt[:-1] | 6 + chosen | 6 + rejected | other: (no prompt) 1 + chosen | 1 + rejected | pad
    assert rows["input_ids"] == [1, 5, 6, 7, 8, 6, 9, 2, 1, 3, 1, 4, 4, 0, 0, 0]
    assert rows["segment_ids"] == [u1(0)] * 2 + [u1(1)] * 3 + [u1(2)] * 3 + [u2(1)] * 2 + [u2(2)] * 3 + [0] * 3
    assert rows["positions"] == [0, 1, 2, 3, 4, 2, 3, 4, 0, 1, 0, 1, 2, 0, 0, 0]
    assert rows["labels"] == [5, 0, 7, 8, 0, 9, 2, 0, 3, 0, 4, 4, 0, 0, 0, 0]
    assert rows["loss_mask"] == [0, 0, 1, 1, 0, 1, 1, 0, 1, 0, 1, 1, 0, 0, 0, 0]
    assert rows["sequence_ids"] == [0, 0, 0, 0, 0, 2, 2, 2, 1, 1, 3, 3, 3, 0, 0, 0]
    # Both sequences of a pair, as the padded rows hold them, read back from the unit.
    ids = np.array(rows["input_ids"])
    chosen_path = [0, 1, 2, 3, 4]
    rejected_path = [0, 1, 5, 6, 7]
    assert ids[chosen_path].tolist() == [1, 5, 6, 7, 8] and ids[rejected_path].tolist() == [1, 5, 6, 9, 2]


GEMMA3 = cfg_lib.tiny(model_type="gemma3_text", vocab_size=64, num_hidden_layers=3, head_dim=16,
                      query_pre_attn_scalar=20, sliding_window=4,
                      layer_types=("sliding_attention", "full_attention", "sliding_attention"),
                      rope_local_base_freq=100.0, tie_word_embeddings=True, attention_block_size=8,
                      shared_prompt_masks=True)  # local and global layers in one stack


@pytest.mark.parametrize("impl,window", [("chunked", None), ("xla", None), ("chunked", 5), ("xla", 5),
                                         ("chunked", "gemma3"), ("xla", "gemma3")])
def test_a_branch_sees_its_prompt_and_never_the_other_branch(impl, window):
    """Hidden states of a unit's positions equal those of the pair's own sequences run alone (so each branch sees
    the whole prompt and itself; with a sliding window of 5, or Gemma 3's local layers' 4 beside its global ones,
    the window measured by each sequence's own positions, so the rejected branch still sees its prompt's last
    tokens across the chosen branch); changing the chosen branch leaves the rejected one exactly put."""
    conf = (GEMMA3.replace(attention_impl=impl) if window == "gemma3"
            else CONF.replace(attention_impl=impl, sliding_window=window))
    params = model.init_params(conf, jax.random.key(1))
    pairs = _pairs(3, seed=5)
    lay = packing.plan(pairs, micro=1, shards=1, buckets=BUCKETS, row_length=128, shared=True)
    assert lay.rows_per_group == 1
    rows = packing.materialize(pairs, lay, [0])
    ids, seg, pos = (rows[k][0] for k in ("input_ids", "segment_ids", "positions"))

    def hidden(x):
        return np.asarray(model.forward_hidden(conf, params, x, segment_ids=seg, positions=pos)[0])[0]

    h = hidden(ids)
    t = 0
    for j, _ in lay.rows[0][0]:
        p, c, r = (pairs[j][k] for k in ("prompt", "chosen", "rejected"))
        for branch, completion, at in (("chosen", c, t + len(p) - 1), ("rejected", r, t + len(p) + len(c))):
            seq = np.concatenate([p, completion])[None]
            alone = np.asarray(model.forward_hidden(conf, params, seq)[0])[0]
            unit = np.concatenate([h[t:t + len(p) - 1], h[at:at + 1 + len(completion)]])
            np.testing.assert_allclose(unit, alone, rtol=2e-5, atol=2e-5, err_msg=f"pair {j} {branch}")
        t += packing.unit_length(pairs[j])
    other, row = ids.copy(), seg[0]
    chosen_branch = (row >= SHARED) & ((row & 3) == 1)
    other[0, chosen_branch] = (other[0, chosen_branch] + 7) % 60 + 3
    moved = hidden(other)
    keep = ~chosen_branch & (row > 0)
    # (Not bitwise: the MoE's expert buffers hold every token of the batch, so their sums' order moves by ulps.)
    np.testing.assert_allclose(moved[keep], h[keep], rtol=0, atol=1e-6)
    assert np.abs(moved[chosen_branch] - h[chosen_branch]).max() > 1e-3


def test_the_mask_rule_leaves_ordinary_segments_alone():
    seg = jnp.array([[1, 1, 2, 2, shared_id(1, 0), shared_id(1, 1), shared_id(1, 2), shared_id(2, 0), 0]])
    m = np.asarray(attention.mask_BxSxT(seg, None, shared=True))[0]
    want = np.zeros_like(m)
    for q, k in [(0, 0), (1, 0), (1, 1), (2, 2), (3, 2), (3, 3), (4, 4), (5, 4), (5, 5), (6, 4), (6, 6), (7, 7)]:
        want[q, k] = True
    np.testing.assert_array_equal(m, want)
    plain = np.asarray(attention.mask_BxSxT(seg, None))[0]  # without the switch: each id its own segment
    np.testing.assert_array_equal(plain, want & (seg[0][:, None] == seg[0][None, :]))
    assert not plain[5, 4] and m[5, 4]


def _batches(pairs, micro=1):
    padded = data.collate(pairs, BUCKETS)
    mesh = shd.make_mesh(shd.MeshConfig(data=1), CONF, jax.devices()[:1])
    dcfg = data.DataConfig(train_path="x", packing=True, share_prompt=True)
    shared = plan_lib.place_packed(pairs, None, micro, mesh, shd.MeshConfig(data=1), dcfg, BUCKETS)
    return padded, jax.tree.map(np.asarray, shared)


@pytest.mark.parametrize("impl,window", [("auto", None), ("chunked", 5), ("xla", 5)])
def test_shared_prompts_equal_padded_losses_and_gradients(impl, window):
    """(With a sliding window, the chunked kernel's backward reaches each rejected branch's prompt blocks too.)"""
    pairs = _pairs(8)
    padded, shared = _batches(pairs)
    real_shared = int((shared["segment_ids"] > 0).sum())
    assert real_shared == sum(packing.unit_length(p) for p in pairs) < int((padded["segment_ids"] > 0).sum())
    conf = CONF.replace(attention_impl=impl, sliding_window=window)
    params, ref, both = policy_reference_and_losses(conf, LossSection(type="dpo", beta=0.3))
    for ((l_pad, m_pad), g_pad), ((l_sh, m_sh), g_sh) in zip(both(params, ref, padded),
                                                             both(params, ref, step.unpair(shared))):
        np.testing.assert_allclose(l_sh, l_pad, rtol=1e-5)
        for k in ("logps/chosen", "logps/rejected", "rewards/margins"):
            np.testing.assert_allclose(m_sh[k], m_pad[k], rtol=1e-5, atol=1e-5 if k == "rewards/margins" else 1e-6,
                                       err_msg=k)
        assert int(m_sh["tokens"]) == real_shared  # the prompt's tokens once a pair
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g_sh, g_pad)


def test_the_config_refuses_what_shared_prompts_cannot_do():
    base = RunConfig(data=data.DataConfig(train_path="x", share_prompt=True))
    with pytest.raises(ConfigError, match="data.share_prompt.*data.packing=true"):
        base.validate()
    def with_data(**kw):
        return dataclasses.replace(base, data=data.DataConfig(train_path="x", packing=True, share_prompt=True, **kw))
    with pytest.raises(ConfigError, match="packing_length=300 must hold it"):
        with_data(packing_length=300, max_length=256).validate()
    assert with_data(packing_length=512, max_length=256).validate()
    cfg = with_data()
    windowed = GEMMA3.replace(shared_prompt_masks=False)  # sliding windows are planned, with the shared masks on
    assert plan_lib.plan(cfg, jax.devices()[:1], config=windowed).mconf.shared_prompt_masks
    with pytest.raises(ConfigError, match="model.attention_impl=chunked"):
        plan_lib.plan(cfg, jax.devices()[:1], config=CONF.replace(attention_impl="splash"))


def test_a_run_with_shared_prompts_starts_where_a_packed_run_starts(tmp_path):
    """`python -m jsmaug.train` with data.share_prompt, as a user runs it: the log says so, and the first step's
    log-probs (before any update, the same pairs by the balanced order) equal a packed run's without it."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from cli_env import cli_env
    from tests.test_run_programs import SMALL

    root = Path(__file__).resolve().parent.parent
    rows = [{"prompt": f"Q{i}: what is {i} plus {i} and then {i} times three?",
             "chosen": " " + "yes " * (1 + 5 * (i % 3)), "rejected": f" {2 * i + 1}"} for i in range(12)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    first = {}
    for share in ("true", "false"):
        work = tmp_path / f"w_{share}"
        args = ["configs/tiny_dpo.yaml", *SMALL, f"data.train_path={tmp_path / 'pairs.jsonl'}", f"workdir={work}",
                "train.steps=2", "data.packing=true", f"data.share_prompt={share}"]
        r = subprocess.run([sys.executable, "-m", "jsmaug.train", *args], cwd=root, env=cli_env(1),
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        assert ("each pair's prompt once (data.share_prompt)" in r.stdout) == (share == "true"), r.stdout
        recs = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines() if '"tokens"' in x]
        first[share] = recs[0]
    for k in ("logps/chosen", "logps/rejected"):
        np.testing.assert_allclose(first["true"][k], first["false"][k], rtol=1e-5, err_msg=k)
    assert first["true"]["tokens"] < first["false"]["tokens"]  # the prompts' tokens once a pair
