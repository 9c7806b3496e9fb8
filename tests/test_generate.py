"""KV-cache generation against HF `generate`, and the sampling filters."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from hf_fixtures import make_hf_checkpoint
from jsmaug.models import fast_decode, generate as gen
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
    """Both decoding steps: the fast one (the default for these families) and the decoder's own `decode`."""
    torch_model, config, params = tiny
    assert gen.fast_step_applies(config)
    theirs = _hf_generate(torch_model, PROMPTS, None)
    for fast in (True, False):
        ours = gen.generate(config, params, PROMPTS, gen.SamplingConfig(max_new_tokens=NEW, eos_id=None), fast=fast)
        assert ours == theirs
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


@pytest.mark.parametrize("kind", ["flat", "normal", "peaked", "ties", "minus_inf", "top_k_then_top_p"])
def test_nucleus_cutoff_without_a_sort_keeps_what_the_sort_keeps(kind):
    """The fallback draw's top-p cutoff by bisection over the floats' order keeps exactly the tokens that the
    sorted cumulative mass keeps (`_filter_logits`), for flat and peaked rows, ties at the edge and -inf logits."""
    rng = np.random.default_rng(len(kind))
    logits = rng.normal(size=(24, 700)) * {"flat": 0.02, "peaked": 8.0}.get(kind, 1.0)
    if kind == "ties":
        logits = np.round(logits * 2) / 2  # a handful of distinct values: the edge falls inside a tie
    if kind == "minus_inf":
        logits[:, ::3] = -np.inf
    logits = jnp.asarray(logits, jnp.float32)
    cut = 0
    for top_p in (0.05, 0.5, 0.9, 0.95, 0.999):
        sc = gen.SamplingConfig(temperature=0.7, top_p=top_p, top_k=50 if kind == "top_k_then_top_p" else 0)
        want = np.isfinite(np.asarray(gen._filter_logits(logits, sc)))
        got = np.isfinite(np.asarray(jax.jit(lambda x, sc=sc: gen._filter_logits_unsorted(x, sc))(logits)))
        assert (got == want).all(), (top_p, np.argwhere(got != want)[:5])
        assert want.sum(axis=1).min() > 0
        cut += int((want.sum(axis=1) < want.shape[1]).sum())
    assert cut > 24  # the cutoffs compared are not all "keep everything"


def test_float_order_keys_round_trip():
    x = jnp.asarray([-np.inf, -3e38, -1.5, -1e-40, -0.0, 0.0, 1e-40, 2.0, 3e38, np.inf], jnp.float32)
    keys = np.asarray(gen._ordered_u32(x))
    assert (np.diff(keys.astype(np.int64)) > 0).all()
    np.testing.assert_array_equal(np.asarray(gen._float_of(jnp.asarray(keys))).view(np.uint32),
                                  np.asarray(x).view(np.uint32))


def _draws(logits_V, sc, n=4000):
    """n draws of `_next_token` for one row of logits, each row its own key."""
    logits = jnp.broadcast_to(jnp.asarray(logits_V, jnp.float32), (n, len(logits_V)))
    return np.asarray(jax.jit(lambda l, k: gen._next_token(l, k, jnp.zeros(n, jnp.int32), sc))(
        logits, gen.row_keys(5, np.arange(n))))


@pytest.mark.parametrize("case", ["nucleus_within_candidates", "nucleus_past_candidates", "top_k_tie_at_the_edge"])
def test_draws_follow_the_filtered_distribution_whichever_path_draws_them(case):
    """`_next_token` draws among `lax.top_k`'s candidates when they hold the kept set, and from the whole filtered
    vocabulary otherwise (a nucleus of more than NUCLEUS_CANDIDATES tokens, a tie at the top-k edge): either way the
    tokens are the kept ones of `_filter_logits` and their frequencies its renormalised probabilities."""
    v = 600
    rng = np.random.default_rng(0)
    if case == "nucleus_within_candidates":  # 4 tokens carry the nucleus, the rest near nothing
        logits = np.full(v, -30.0) + rng.normal(size=v)
        logits[[3, 77, 400, 599]] = np.log([0.5, 0.25, 0.15, 0.1])
        sc = gen.SamplingConfig(temperature=1.0, top_p=0.85)
    elif case == "nucleus_past_candidates":  # flat: the 0.9 nucleus needs ~540 of 600 tokens
        logits = rng.normal(size=v) * 0.05
        sc = gen.SamplingConfig(temperature=1.0, top_p=0.9)
    else:  # top-k 3 with the 3rd and 4th most likely tied: both kept, as HF's TopKLogitsWarper keeps ties
        logits = np.full(v, -30.0)
        logits[[10, 20, 30, 40]] = np.log([0.4, 0.3, 0.15, 0.15])
        sc = gen.SamplingConfig(temperature=1.0, top_k=3)
    filtered = np.asarray(gen._filter_logits(jnp.asarray(logits[None], jnp.float32), sc))[0]
    kept = np.isfinite(filtered)
    probs = np.where(kept, np.exp(filtered - filtered[kept].max()), 0.0)
    probs /= probs.sum()
    got = _draws(logits, sc)
    assert kept[got].all()
    if case != "nucleus_past_candidates":  # there each of ~540 tokens is drawn a handful of times
        freq = np.bincount(got, minlength=v) / len(got)
        np.testing.assert_allclose(freq[kept], probs[kept], atol=0.03)
    else:
        assert kept.sum() > gen.NUCLEUS_CANDIDATES and len(set(got.tolist())) > gen.NUCLEUS_CANDIDATES


def test_bad_settings_are_errors():
    with pytest.raises(ValueError, match="top_p"):
        gen.SamplingConfig(top_p=0.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        gen.SamplingConfig(max_new_tokens=0)
    with pytest.raises(ValueError, match="at least one token"):
        gen.left_pad([[1, 2], []])


# ---------------------------------------------------------------------------------------------- stop_check, chunks

LONG = 40  # 1 token from the prefill + 39 from chunks of chunk_length(40) = 32 steps: 2 chunk calls to the end


def _count_chunks(monkeypatch):
    calls = []
    real = gen._decode_chunk

    def counted(*args):
        calls.append(args[3])  # the chunk's length
        return real(*args)
    monkeypatch.setattr(gen, "_decode_chunk", counted)
    return calls


def test_stop_check_truncates_the_uninterrupted_run(tiny, monkeypatch):
    """Rows finishing at different times (in the prefill's token, in the second chunk, never): each row is the
    uninterrupted run's row cut after the token on which stop_check first said True."""
    _, config, params = tiny
    sc = gen.SamplingConfig(max_new_tokens=LONG, eos_id=None)
    free = gen.generate(config, params, PROMPTS, sc)
    assert gen.chunk_length(LONG) == 32 and all(len(r) == LONG for r in free)
    stop_at = {0: 1, 1: 35}
    seen = []

    def stop_check(row, new):
        seen.append((row, len(new)))
        assert new == free[row][:len(new)]  # called with the row's tokens so far, in order
        return len(new) == stop_at.get(row, -1)
    calls = _count_chunks(monkeypatch)
    got = gen.generate(config, params, PROMPTS, sc, stop_check=stop_check)
    assert got == [free[0][:1], free[1][:35], free[2]]
    assert calls == [32, 32]
    # once per new token of an unfinished row, never after it finished (nor for the last token: max_new_tokens)
    assert sorted(seen) == [(0, 1)] + [(1, n) for n in range(1, 36)] + [(2, n) for n in range(1, LONG)]


def test_early_exit_when_every_row_is_finished(tiny, monkeypatch):
    _, config, params = tiny
    sc = gen.SamplingConfig(max_new_tokens=LONG, eos_id=None)
    free = gen.generate(config, params, PROMPTS, sc)
    calls = _count_chunks(monkeypatch)
    got = gen.generate(config, params, PROMPTS, sc, stop_check=lambda row, new: len(new) == 2 + row)
    assert got == [row[:2 + r] for r, row in enumerate(free)]
    assert calls == [32]  # every row finished in the first chunk: the second never runs
    calls.clear()
    assert gen.generate(config, params, PROMPTS, sc, stop_check=lambda row, new: True) == [r[:1] for r in free]
    assert calls == []  # finished on the prefill's token


def test_eos_ends_generation_early(tiny, monkeypatch):
    """Without stop_check: the batch stops after the chunk in which its last row emitted EOS; rows keep their EOS
    and drop what follows, as before chunking."""
    _, config, params = tiny
    sc = gen.SamplingConfig(max_new_tokens=LONG, eos_id=None)
    prompt = [PROMPTS[1]]
    free = gen.generate(config, params, prompt, sc)[0]
    eos = free[4]
    calls = _count_chunks(monkeypatch)
    got = gen.generate(config, params, prompt, gen.SamplingConfig(max_new_tokens=LONG, eos_id=eos))
    assert got == [free[:free.index(eos) + 1]]
    assert calls == [32]


@pytest.mark.parametrize("kw", [dict(model_type="qwen2"), dict(model_type="qwen3", tie_word_embeddings=True, rope_type="yarn",
                                                                      rope_factor=4.0, rope_mscale=1.0,
                                                                      rope_original_max_position_embeddings=32),
                                dict(model_type="olmoe", clip_qkv=0.5, num_local_experts=4, num_experts_per_tok=2)])
def test_fast_step_equals_decoder_decode(kw):
    """The switches the HF-compared fixtures above do not reach (q/k/v biases, per-head and whole-projection q/k
    norms, clipping, tied embeddings, yarn RoPE): the fast step's tokens, greedy and sampled, equal the decoder's `decode`'s."""
    import jax
    from jsmaug.models import config as config_lib

    config = config_lib.tiny(**kw)
    params = model.init_params(config, jax.random.key(0))
    assert gen.fast_step_applies(config)
    sampled = gen.SamplingConfig(max_new_tokens=NEW, eos_id=None, temperature=0.7, top_p=0.95)
    greedy = gen.SamplingConfig(max_new_tokens=NEW, eos_id=None)
    for sc in (greedy, sampled) if kw.get("tie_word_embeddings") else (greedy,):
        assert gen.generate(config, params, PROMPTS, sc, seed=3, fast=True) == \
            gen.generate(config, params, PROMPTS, sc, seed=3, fast=False)


def test_fast_step_only_for_what_it_computes(monkeypatch):
    """Gemma, and any config field the fast step does not know (one added to ModelConfig later) set away from its
    default: the decoder's own `decode` runs. LoRA is computed (adapters merged once per call,
    tests/test_generate_qlora.py)."""
    from jsmaug.models import config as config_lib

    base = config_lib.tiny(model_type="mistral", sliding_window=8)
    assert gen.fast_step_applies(base)
    assert gen.fast_step_applies(base.replace(lora_rank=4))
    assert not gen.fast_step_applies(config_lib.tiny(model_type="gemma3_text"))
    monkeypatch.setattr(fast_decode, "_KNOWN_FIELDS", fast_decode._KNOWN_FIELDS - {"sliding_window"})
    assert not gen.fast_step_applies(base) and gen.fast_step_applies(base.replace(sliding_window=None))
