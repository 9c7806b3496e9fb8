"""Per-row sampling keys (`generate.row_keys`): a row's samples depend on its own key and prompt, not on the rows
it shares a call with, its batch position or the padding. One tiny Mixtral-shaped model; every call uses
max_new_tokens 8 (one chunk length). The same samples on a mesh: tests/test_pairs_sample.py
(test_the_same_pairs_on_a_mesh), through `jsmaug pairs sample`'s own path."""

import jax
import pytest

from jsmaug.models import config as config_lib, decoder as model, generate as gen

NEW = 8
HOT = gen.SamplingConfig(max_new_tokens=NEW, eos_id=None, temperature=1.0, top_p=0.9)
# three problems; the third is longer than 16 tokens, so a call holding it pads every prompt to 32
PROBLEMS = [[1, 5, 9, 33, 12, 7], [1, 40, 41], [1] + list(range(60, 80))]
K = 2
ROWS = [(n, j) for n in range(len(PROBLEMS)) for j in range(K)]  # (problem, sample)


@pytest.fixture(scope="module")
def tiny():
    cfg = config_lib.tiny()
    return cfg, jax.jit(model.init_params, static_argnums=0)(cfg, jax.random.key(1))


def _sample(cfg, params, rows, seed=0, sc=HOT, **kw):
    return gen.generate(cfg, params, [PROBLEMS[n] for n, _ in rows], sc, keys=gen.row_keys(seed, rows), **kw)


@pytest.fixture(scope="module")
def together(tiny):
    """Every problem's K samples in one call (6 rows, prompts padded to 32)."""
    return dict(zip(ROWS, _sample(*tiny, ROWS)))


def test_reproducible_for_a_seed(tiny, together):
    assert dict(zip(ROWS, _sample(*tiny, ROWS))) == together
    other = dict(zip(ROWS, _sample(*tiny, ROWS, seed=1)))
    assert all(other[r] != together[r] for r in ROWS)
    assert all(together[(n, 0)] != together[(n, 1)] for n in range(len(PROBLEMS)))  # a problem's samples differ


def test_a_rows_samples_do_not_depend_on_the_call(tiny, together):
    """Problem 1's second sample and problem 0's first, in that order, in a call of their own (2 rows, prompts
    padded to 16 instead of 32, other batch positions, no problem 2): the same tokens. (Dummy rows: a call padded
    by `row_multiple` in tests/test_pairs_sample.py's mesh test.)"""
    rows = [(1, 1), (0, 0)]
    assert _sample(*tiny, rows) == [together[r] for r in rows]


def test_default_keys_are_the_row_numbers(tiny, together):
    cfg, params = tiny
    prompts = [PROBLEMS[n] for n, _ in ROWS]
    assert gen.generate(cfg, params, prompts, HOT, seed=4) == \
        gen.generate(cfg, params, prompts, HOT, keys=gen.row_keys(4, range(len(prompts))))
    with pytest.raises(ValueError, match=r"one key per prompt, shape \(6,\)"):
        gen.generate(cfg, params, prompts, HOT, keys=gen.row_keys(4, range(5)))
    with pytest.raises(ValueError, match="row_keys"):
        gen.row_keys(0, [-1])
