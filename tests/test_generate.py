"""KV-cache generation against HF `generate`, and the sampling filters."""

import numpy as np
import pytest

import jax.numpy as jnp

from hf_fixtures import make_hf_checkpoint
from jsmaug.models import generate as gen
from jsmaug import hf
from jsmaug.models import decoder as model

PROMPTS = [[1, 5, 9, 33, 12, 7], [1, 40, 41], [1, 8, 8, 9, 10, 11, 12, 13, 14, 15]]
NEW = 12


@pytest.fixture(scope="module", params=["gqa", "sliding_window_mqa"])
def tiny(request, tmp_path_factory):
    kw = {"gqa": {}, "sliding_window_mqa": dict(sliding_window=4, num_key_value_heads=1, num_local_experts=5)}
    path = tmp_path_factory.mktemp(request.param)
    torch_model = make_hf_checkpoint(path, seed=3, **kw[request.param])
    config, params = hf.load(path)
    return torch_model, config, params


def _hf_generate(torch_model, prompts, eos_id):
    import torch

    ids, mask = gen.left_pad(prompts, 1)  # HF pads to the longest prompt; we pad to a multiple of 16
    out = torch_model.generate(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask, dtype=torch.long),
                               max_new_tokens=NEW, do_sample=False, pad_token_id=0, eos_token_id=eos_id)
    return out[:, ids.shape[1]:].tolist()


def test_greedy_equals_hf_generate(tiny):
    torch_model, config, params = tiny
    ours = gen.generate(config, params, PROMPTS, gen.SamplingConfig(max_new_tokens=NEW, eos_id=None))
    assert ours == _hf_generate(torch_model, PROMPTS, None)
    assert all(len(r) == NEW for r in ours)


def test_greedy_stops_at_eos_like_hf(tiny):
    torch_model, config, params = tiny
    free = gen.generate(config, params, PROMPTS, gen.SamplingConfig(max_new_tokens=NEW, eos_id=None))
    eos = free[1][2]  # a token row 1 emits third: that row must stop there
    ours = gen.generate(config, params, PROMPTS, gen.SamplingConfig(max_new_tokens=NEW, eos_id=eos))
    assert ours[1] == free[1][:free[1].index(eos) + 1]
    theirs = _hf_generate(torch_model, PROMPTS, eos)
    for row_ours, row_hf in zip(ours, theirs):
        if eos in row_hf:  # HF pads after EOS (and may stop the whole batch early)
            row_hf = row_hf[:row_hf.index(eos) + 1]
        assert row_ours == row_hf


def test_prefill_logits_equal_forward(tiny):
    """The cached path over a whole prompt gives the plain forward's logits."""
    _, config, params = tiny
    ids = np.array([PROMPTS[2]])
    want, _ = model.forward(config, params, ids)
    valid = np.ones((1, ids.shape[1] + 4), np.int32)
    valid[:, ids.shape[1]:] = 0
    pos = np.arange(ids.shape[1])[None]
    got, cache = model.decode(config, params, ids, pos, valid, model.init_cache(config, 1, ids.shape[1] + 4), 0)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
    assert cache[0].shape == (config.num_hidden_layers, 1, ids.shape[1] + 4, config.num_key_value_heads,
                              config.resolved_head_dim)


def test_sampling(tiny):
    _, config, params = tiny
    greedy = gen.generate(config, params, PROMPTS, gen.SamplingConfig(max_new_tokens=NEW, eos_id=None))
    top1 = gen.generate(config, params, PROMPTS, gen.SamplingConfig(max_new_tokens=NEW, eos_id=None,
                                                                     temperature=1.0, top_k=1), seed=5)
    assert top1 == greedy
    hot = gen.SamplingConfig(max_new_tokens=NEW, eos_id=None, temperature=20.0)
    a = gen.generate(config, params, PROMPTS, hot, seed=1)
    assert a == gen.generate(config, params, PROMPTS, hot, seed=1)
    assert a != gen.generate(config, params, PROMPTS, hot, seed=2)


def test_filter_logits_top_k_and_top_p():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda sc: np.isfinite(np.asarray(gen._filter_logits(logits, sc)))[0].tolist()
    assert kept(gen.SamplingConfig(temperature=1.0, top_k=3)) == [True, True, True, False]
    # Nucleus: the smallest prefix whose mass reaches p. 0.5 < 0.7 <= 0.5 + 0.3.
    assert kept(gen.SamplingConfig(temperature=1.0, top_p=0.7)) == [True, True, False, False]
    assert kept(gen.SamplingConfig(temperature=1.0, top_p=0.5)) == [True, False, False, False]
    assert kept(gen.SamplingConfig(temperature=1.0, top_p=0.96)) == [True, True, True, True]


def test_bad_settings_are_errors():
    with pytest.raises(ValueError, match="top_p"):
        gen.SamplingConfig(top_p=0.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        gen.SamplingConfig(max_new_tokens=0)
    with pytest.raises(ValueError, match="at least one token"):
        gen.left_pad([[1, 2], []])
