"""factored.Factored: x @ W + s (x @ A) @ B equals x @ (W + s A @ B) in every contraction the MoE paths use (both
directions, with batch axes, in the grouped matmuls), and the hand-written adapter gradients (`weight_grad`)
equal autodiff of the materialised sum; the frozen base gets none."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jsmaug.models import factored, grouped_matmul

E, C, D, F, R, S = 3, 5, 8, 6, 2, 0.75
KEYS = jax.random.split(jax.random.key(0), 6)
W = jax.random.normal(KEYS[0], (E, D, F))
A = jax.random.normal(KEYS[1], (E, D, R))
B = jax.random.normal(KEYS[2], (E, R, F))
FW = factored.Factored(W, A, B, S)
MERGED = W + S * jnp.einsum("edr,erf->edf", A, B)


@pytest.mark.parametrize("spec,x_shape", [("ecd,edf->ecf", (E, C, D)),   # y = x W, batched (the buffers)
                                          ("ecf,edf->ecd", (E, C, F)),   # y = x W^T (a backward)
                                          ("td,edf->tef", (C, D)),       # every expert on every token
                                          ("tef,edf->ted", (C, E, F))])
def test_einsum_equals_the_materialised_sum(spec, x_shape):
    x = jax.random.normal(KEYS[3], x_shape)
    np.testing.assert_allclose(factored.einsum(spec, x, FW), jnp.einsum(spec, x, MERGED), rtol=1e-5, atol=1e-5)


def test_matmul_and_indexing():
    x = jax.random.normal(KEYS[3], (C, D))
    np.testing.assert_allclose(x @ FW[1], x @ MERGED[1], rtol=1e-5, atol=1e-5)
    idx = jnp.array([2, 0, 2])
    np.testing.assert_allclose(jnp.einsum("mcd,mdf->mcf", jnp.stack([x] * 3), FW[idx].w), jnp.stack(
        [x @ W[2], x @ W[0], x @ W[2]]), rtol=1e-6)
    assert FW.shape == W.shape and FW.astype(jnp.bfloat16).b.dtype == jnp.bfloat16


def test_weight_grad_equals_autodiff_of_the_sum_and_the_base_gets_none():
    x = jax.random.normal(KEYS[3], (E, C, D))
    dy = jax.random.normal(KEYS[4], (E, C, F))
    loss = lambda a, b: jnp.sum(jnp.einsum("ecd,edf->ecf", x, W + S * jnp.einsum("edr,erf->edf", a, b)) * dy)
    da, db = jax.grad(loss, argnums=(0, 1))(A, B)
    g = factored.with_frozen_base(factored.weight_grad("e", x, dy, FW), FW)
    np.testing.assert_allclose(g.a, da, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(g.b, db, rtol=1e-4, atol=1e-4)
    assert float(jnp.max(jnp.abs(g.w))) == 0.0 and g.w.shape == W.shape
    np.testing.assert_allclose(factored.weight_grad("e", x, dy, W), jax.grad(
        lambda w: jnp.sum(jnp.einsum("ecd,edf->ecf", x, w) * dy))(W), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["ragged", "megablox"])
def test_grouped_matmul_with_adapters_and_their_gradients(impl):
    sizes = jnp.array([4, 0, 3], jnp.int32)  # 7 of 8 rows grouped; the last is past the groups
    x = jax.random.normal(KEYS[5], (8, D))

    def run(a, b, merged):
        rhs = W + S * jnp.einsum("edr,erf->edf", a, b) if merged else factored.Factored(W, a, b, S)
        return grouped_matmul.grouped_matmul(x, rhs, sizes, impl)

    want = run(A, B, True)
    np.testing.assert_allclose(run(A, B, False), want, rtol=1e-5, atol=1e-5)
    assert float(jnp.max(jnp.abs(want[7]))) == 0.0 and float(jnp.max(jnp.abs(want[:4] - x[:4] @ MERGED[0]))) < 1e-4
    dy = jax.random.normal(KEYS[4], want.shape)
    grads = [jax.grad(lambda a, b: jnp.sum(run(a, b, m) * dy), argnums=(0, 1))(A, B) for m in (False, True)]
    for got, ref in zip(*grads):
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
