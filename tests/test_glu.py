"""The experts' gated activations (jsmaug/models/glu.py): gpt-oss's clamped SwiGLU against a NumPy transcription of
HF's GptOssExperts, its hand-written derivative against autodiff (the clamps reached); and every MoE dispatch path
with the clamped SwiGLU and gate/up biases against the dense reference path, in values and gradients (bucketed's
hand-written VJP through its overflow blocks included)."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jsmaug.models import moe
from jsmaug.models.glu import SWIGLU, Glu

CLAMPED = Glu(limit=0.7, alpha=1.702)  # a small limit, so that the test's activations reach both clamps


def _np_gpt_oss(p1, p3, limit, alpha):
    gate, up = np.minimum(p1, limit), np.clip(p3, -limit, limit)
    return (up + 1) * gate / (1 + np.exp(-alpha * gate))


def test_clamped_swiglu_equals_hf_formula_and_its_derivative_equals_autodiff():
    p1, p3, dh = (jax.random.normal(k, (64, 8)) for k in jax.random.split(jax.random.key(0), 3))
    np.testing.assert_allclose(CLAMPED(p1, p3), _np_gpt_oss(np.asarray(p1), np.asarray(p3), 0.7, 1.702), rtol=1e-5,
                               atol=1e-6)
    assert float(jnp.mean(p1 > 0.7)) > 0.1 and float(jnp.mean(jnp.abs(p3) > 0.7)) > 0.2
    for glu in (CLAMPED, SWIGLU):
        want = jax.grad(lambda a, b: jnp.sum(glu(a, b) * dh), argnums=(0, 1))(p1, p3)
        for got, ref in zip(glu.grads(p1, p3, dh), want):
            np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def _problem(skew):
    t, d, f, e, k = 40, 16, 24, 4, 2
    ks = jax.random.split(jax.random.key(1), 8)
    x = jax.random.normal(ks[0], (t, d))
    logits = (jax.random.normal(ks[1], (t, e)) * 2.0).at[:, 1].add(skew)
    ws = [jax.random.normal(kk, s) * 0.3 for kk, s in zip(ks[2:5], ((e, d, f), (e, d, f), (e, f, d)))]
    b13 = tuple(jax.random.normal(kk, (e, f)) * 0.5 for kk in ks[5:7])
    return x, logits, ws, b13, k


@pytest.mark.parametrize("impl,kw,skew", [("bucketed", {}, 30.0), ("ragged", {}, 0.0),
                                          ("blocked", {"block_size": 8}, 0.0),
                                          ("capacity", {"capacity_factor": 100.0}, 0.0)])
def test_every_path_with_clamped_glu_and_biases_equals_dense(impl, kw, skew):
    x, logits, ws, b13, k = _problem(skew)
    _, idx, gates = moe.route(logits, k)

    def loss(path, **pkw):
        def f(x, ws, b13):
            y, _ = moe.expert_ffn(x, idx, gates, *ws, impl=path, glu=CLAMPED, b13=b13, **pkw)
            return jnp.sum(jnp.sin(y))
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(x, ws, b13)

    got, want = loss(impl, **kw), loss("dense")
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), got[1], want[1])
    assert float(jnp.max(jnp.abs(want[1][2][0]))) > 1e-3  # the biases do get gradients
    # the dense path itself against the formula, token by token
    y = moe.expert_ffn(x, idx, gates, *ws, impl="dense", glu=CLAMPED, b13=b13)[0]
    xs, w1, w3, w2 = (np.asarray(v) for v in (x, *ws))
    ref = np.zeros_like(xs)
    for t in range(xs.shape[0]):
        for j in range(k):
            e = int(idx[t, j])
            h = _np_gpt_oss(xs[t] @ w1[e] + np.asarray(b13[0][e]), xs[t] @ w3[e] + np.asarray(b13[1][e]), 0.7, 1.702)
            ref[t] += float(gates[t, j]) * (h @ w2[e])
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5)
