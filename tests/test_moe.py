"""Every MoE dispatch path against the dense reference: outputs and gradients, float32."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jsmaug.models import moe


def _problem(num_tokens=37, d=16, f=24, e=5, k=2, seed=0):
    ks = jax.random.split(jax.random.key(seed), 5)
    x = jax.random.normal(ks[0], (num_tokens, d))
    logits = jax.random.normal(ks[1], (num_tokens, e)) * 2.0
    w1 = jax.random.normal(ks[2], (e, d, f)) * 0.2
    w3 = jax.random.normal(ks[3], (e, d, f)) * 0.2
    w2 = jax.random.normal(ks[4], (e, f, d)) * 0.2
    return x, logits, w1, w3, w2, k


def _layer(impl, **kw):
    def f(x, logits, w1, w3, w2, k):
        _, idx, w = moe.route(logits, k)
        y, dropped = moe.expert_ffn(x, idx, w, w1, w3, w2, impl=impl, **kw)
        return y, dropped
    return f


@pytest.mark.parametrize("impl,kw", [("ragged", {}), ("megablox", {}), ("blocked", {"block_size": 8}), ("blocked", {"block_size": 128}),
                                     ("capacity", {"capacity_factor": 100.0}), ("bucketed", {})])
@pytest.mark.parametrize("k", [1, 2])
def test_paths_match_dense(impl, kw, k):
    x, logits, w1, w3, w2, _ = _problem(k=k)
    ref = jax.jit(_layer("dense"), static_argnums=5)
    got = jax.jit(_layer(impl, **kw), static_argnums=5)
    y_ref, _ = ref(x, logits, w1, w3, w2, k)
    y, dropped = got(x, logits, w1, w3, w2, k)
    np.testing.assert_allclose(y, y_ref, atol=1e-5)
    assert int(dropped) == 0

    def loss(fn):
        return lambda x, l, a, b, c: jnp.sum(jnp.sin(fn(x, l, a, b, c, k)[0]))

    g_ref = jax.jit(jax.grad(loss(_layer("dense")), argnums=(0, 1, 2, 3, 4)))(x, logits, w1, w3, w2)
    g = jax.jit(jax.grad(loss(_layer(impl, **kw)), argnums=(0, 1, 2, 3, 4)))(x, logits, w1, w3, w2)
    for a, b, name in zip(g, g_ref, ["x", "router_logits", "w1", "w3", "w2"]):
        np.testing.assert_allclose(a, b, atol=1e-5, err_msg=name)


def test_capacity_drops_are_counted_and_zeroed():
    x, logits, w1, w3, w2, k = _problem(num_tokens=40, e=4, k=2)
    logits = logits.at[:, 0].add(10.0)  # everyone wants expert 0
    _, idx, w = moe.route(logits, k)
    cf = 0.5
    y, dropped = jax.jit(lambda *a: moe.capacity_ffn(*a, capacity_factor=cf))(x, idx, w, w1, w3, w2)
    capacity = int(np.ceil(cf * 40 * k / 4))
    counts = np.bincount(np.asarray(idx).ravel(), minlength=4)
    assert int(dropped) == int(np.maximum(counts - capacity, 0).sum()) > 0
    # The first `capacity` tokens routed to expert 0 are kept (earlier tokens win), later ones lose expert 0.
    y_dense, _ = moe.dense_ffn(x, idx, w, w1, w3, w2)
    np.testing.assert_allclose(y[0], y_dense[0], atol=1e-5)
    assert not np.allclose(y[-1], y_dense[-1], atol=1e-5)
    # Every token: the dense layer with the dropped assignments' weights zeroed (an assignment is kept while fewer
    # than `capacity` earlier ones, in (token, k) order, went to its expert), in values and in gradients.
    seen, keep = np.zeros(4, int), np.zeros(idx.shape, bool)
    for t, j in np.ndindex(*idx.shape):
        e = int(idx[t, j])
        keep[t, j], seen[e] = seen[e] < capacity, seen[e] + 1
    assert int(dropped) == int((~keep).sum())

    def kept(fn):
        return lambda x, w1, w3, w2: jnp.sum(fn(x, idx, w, w1, w3, w2)[0] ** 2)

    cap = kept(lambda *a: moe.capacity_ffn(*a, capacity_factor=cf))
    ref = kept(lambda x, i, w, *ws: moe.dense_ffn(x, i, jnp.where(keep, w, 0.0), *ws))
    np.testing.assert_allclose(cap(x, w1, w3, w2), ref(x, w1, w3, w2), rtol=1e-5)
    for a, b in zip(jax.grad(cap, argnums=(0, 1, 2, 3))(x, w1, w3, w2),
                    jax.grad(ref, argnums=(0, 1, 2, 3))(x, w1, w3, w2)):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_route_renormalises_topk():
    logits = jnp.array([[0.0, 1.0, 2.0, 3.0]])
    probs, idx, w = moe.route(logits, 2)
    p = np.exp([0, 1, 2, 3.0]) / np.exp([0, 1, 2, 3.0]).sum()
    np.testing.assert_allclose(probs[0], p, rtol=1e-6)
    assert idx.tolist() == [[3, 2]]
    np.testing.assert_allclose(w[0], [p[3] / (p[3] + p[2]), p[2] / (p[3] + p[2])], rtol=1e-6)


def test_load_balancing_loss_is_k_under_even_routing():
    e, k = 4, 2
    counts = jnp.full((e,), 10.0 * k / e)  # 10 tokens, perfectly spread
    probs = jnp.full((e,), 10.0 / e)
    np.testing.assert_allclose(moe.load_balancing_loss(counts, probs, 10.0, e), k, rtol=1e-6)


def test_auto_never_picks_a_path_xla_computes_densely():
    # ragged_dot is a dense fallback on CPU and on GPU (measured on an H200: 86 against bucketed's 461 useful
    # TFLOP/s); on TPU its weight gradient is a masked dense product per expert (plan_pod's HLO), so megablox.
    assert moe.resolve_impl("auto", "cpu") == "bucketed"
    assert moe.resolve_impl("auto", "gpu") == "bucketed"
    assert moe.resolve_impl("auto", "tpu") == "megablox"
    assert moe.resolve_impl("capacity", "gpu") == "capacity"


@pytest.mark.parametrize("impl", ["bucketed", "ragged"])
def test_token_chunks_equal_one_pass_in_values_and_gradients(impl):
    """model.moe_token_chunks: the tokens in rematerialised chunks give the one-pass layer's outputs and gradients."""
    x, logits, w1, w3, w2, k = _problem(num_tokens=36)

    def loss(chunks):
        def f(x, l, a, b, c):
            return jnp.sum(jnp.sin(_layer(impl, token_chunks=chunks)(x, l, a, b, c, k)[0]))
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3, 4)))(x, logits, w1, w3, w2)

    (v1, g1), (v3, g3), (v5, g5) = loss(1), loss(3), loss(5)  # 5 does not divide 36 tokens: 4 chunks of 9
    for v, g in ((v3, g3), (v5, g5)):
        np.testing.assert_allclose(v, v1, rtol=1e-5)
        for a, b in zip(g, g1):
            np.testing.assert_allclose(a, b, atol=1e-5)
