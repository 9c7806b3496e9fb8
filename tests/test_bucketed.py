"""bucketed's layout (jsmaug/models/bucketed.py): the base buffer at the mean load plus overflow blocks. Outputs
and gradients equal the every-expert-on-every-token reference on balanced, skewed and all-on-one routing, each
taking a different overflow rung, with the overflow blocks run both ways (a ladder of batched branches, a loop of
one block per iteration); the ladder's last rung holds any routing; invalid (all_to_all) rows take no row and give
nothing; LoRA adapters (Factored weights) get the gradients of the materialised W + s A @ B through
the overflow blocks too."""

import functools
import itertools

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jsmaug.models import bucketed, factored, moe

T, D, F, E, K = 64, 16, 24, 4, 2


def _problem(skew, seed=3):
    ks = jax.random.split(jax.random.key(seed), 5)
    x = jax.random.normal(ks[0], (T, D))
    logits = (jax.random.normal(ks[1], (T, E)) * 2.0).at[:, 1].add(skew)
    w = [jax.random.normal(kk, s) * 0.2 for kk, s in zip(ks[2:], ((E, D, F), (E, D, F), (E, F, D)))]
    return x, logits, w


def _loss(fn):
    def f(x, logits, w1, w3, w2):
        _, idx, w = moe.route(logits, K)
        y, _ = fn(x, idx, w, w1, w3, w2)
        return jnp.sum(y * jnp.cos(y))
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3, 4)))


@pytest.mark.parametrize("overflow", ["loop", "ladder"])
@pytest.mark.parametrize("skew", [0.0, 3.0, 30.0])
def test_every_rung_equals_dense_in_values_and_gradients(skew, overflow):
    x, logits, w = _problem(skew)
    sizes = np.bincount(np.asarray(moe.route(logits, K)[1]).ravel(), minlength=E)
    layout, ladder = bucketed.plan(T, K, E)
    need = int(bucketed.needed_blocks(jnp.asarray(sizes), *layout))
    # balanced: a few blocks; skewed: more; all on expert 1: its T - C rows beyond the base
    assert {0.0: 0 < need <= 2, 3.0: 2 < need, 30.0: sizes[1] == T}[skew]
    bucketed_ffn = functools.partial(moe.bucketed_ffn, overflow=overflow)
    (l_ref, g_ref), (l, g) = (_loss(moe.dense_ffn)(x, logits, *w), _loss(bucketed_ffn)(x, logits, *w))
    np.testing.assert_allclose(l, l_ref, rtol=1e-5)
    for a, b in zip(g, g_ref):
        np.testing.assert_allclose(a, b, atol=2e-5)
    if skew < 30:  # (at 30 the router's softmax is saturated)
        assert np.abs(np.asarray(g_ref[1])).max() > 1e-3  # the router's gradient is really compared


def test_plan_sizes():
    assert bucketed.plan(2048, 2, 8) == ((512, 128), bucketed.overflow_ladder(4096, 8, 128))
    assert bucketed.plan(2048, 8, 64)[0] == (256, 64)
    assert bucketed.plan(64, 2, 4, mean_load=5.5)[0] == (8, 8)  # at least one 8-row tile
    assert bucketed.plan(16, 8, 2)[0] == (16, 8)  # never more than the tokens
    ladder = bucketed.overflow_ladder(4096, 8, 128)
    assert ladder[:5] == (0, 1, 2, 3, 4) and ladder[-1] == 32 + 8 and list(ladder) == sorted(set(ladder))


def test_the_last_rung_holds_any_routing():
    rng = np.random.default_rng(0)
    for tokens, k, e in itertools.product((8, 64, 200), (1, 2, 8), (2, 8, 64)):
        if k > e:
            continue
        layout, ladder = bucketed.plan(tokens, k, e)
        for trial in range(30):  # sizes of a valid routing: each expert at most `tokens` rows, k * tokens in all
            p = rng.dirichlet(np.full(e, 0.05 if trial % 2 else 1.0))
            sizes = np.minimum(rng.multinomial(tokens * k, p), tokens)
            while sizes.sum() < tokens * k:
                sizes[np.argmin(sizes)] += 1
            assert int(bucketed.needed_blocks(jnp.asarray(sizes), *layout)) <= ladder[-1]


@pytest.mark.parametrize("overflow", ["loop", "ladder"])
def test_invalid_rows_take_no_row(overflow):
    x, logits, w = _problem(3.0)
    _, idx, wt = moe.route(logits, K)
    valid = jnp.arange(T)[:, None] % 3 != 0
    fn = jax.jit(functools.partial(moe.bucketed_ffn, overflow=overflow))
    y, _ = fn(x, idx, wt, *w, valid_TxK=jnp.broadcast_to(valid, idx.shape))
    y_ref, _ = moe.dense_ffn(x, idx, wt * valid, *w)
    np.testing.assert_allclose(y, y_ref, atol=1e-5)


@pytest.mark.parametrize("overflow", ["loop", "ladder"])
def test_factored_adapters_through_overflow_blocks_equal_the_merged_weights(overflow):
    x, logits, w = _problem(30.0)  # most rows on expert 1: several overflow blocks
    ks = jax.random.split(jax.random.key(9), 6)
    a = [jax.random.normal(k, (E, wi.shape[1], 3)) * 0.3 for k, wi in zip(ks[:3], w)]
    b = [jax.random.normal(k, (E, 3, wi.shape[2])) * 0.3 for k, wi in zip(ks[3:], w)]
    _, idx, gates = moe.route(logits, K)
    dy = jnp.cos(jnp.arange(T * D, dtype=jnp.float32)).reshape(T, D)

    def loss(fn, merged):
        def f(a, b, x):
            ws = [wi + 0.5 * jnp.einsum("edr,erf->edf", ai, bi) if merged else factored.Factored(wi, ai, bi, 0.5)
                  for wi, ai, bi in zip(w, a, b)]
            return jnp.sum(fn(x, idx, gates, *ws)[0] * dy)
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(a, b, x)

    got, want = loss(functools.partial(moe.bucketed_ffn, overflow=overflow), False), loss(moe.dense_ffn, True)
    layout, _ = bucketed.plan(T, K, E)
    assert int(bucketed.needed_blocks(jnp.bincount(idx.ravel(), length=E), *layout)) >= 2
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    jax.tree.map(lambda g, r: np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4), got[1], want[1])


def test_overflow_mode_follows_the_platform_and_refuses_unknown_names():
    assert bucketed.overflow_mode("auto") == ("loop" if jax.default_backend() == "cpu" else "ladder")
    assert bucketed.overflow_mode("ladder") == "ladder"
    with pytest.raises(ValueError, match="'loops'"):
        bucketed.overflow_mode("loops")
