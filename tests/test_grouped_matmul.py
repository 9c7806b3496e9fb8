"""Grouped matmul: `megablox` (the Pallas TPU kernels, interpret mode on CPU) and `ragged` against a per-row
reference, values and gradients, with rows past the groups (the all_to_all buffer's empty slots) and empty
groups; those rows give zero and take no gradient."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jsmaug.models import grouped_matmul as gm


def _reference(lhs, rhs, sizes):
    """Row r times the matrix of the group that holds it; rows past the groups give 0."""
    ends = np.cumsum(sizes)
    group = np.searchsorted(ends, np.arange(lhs.shape[0]), side="right")
    out = np.zeros((lhs.shape[0], rhs.shape[2]), np.float64)
    for r, g in enumerate(group):
        if g < len(sizes):
            out[r] = lhs[r] @ rhs[g]
    return out


@pytest.mark.parametrize("impl", gm.IMPLS)
@pytest.mark.parametrize("sizes", [(5, 0, 9, 3), (17, 0, 0, 0), (0, 2, 1, 0)])
def test_values_and_gradients(impl, sizes):
    rng = np.random.default_rng(sum(sizes))
    m, k, n = 21, 16, 24  # 21 rows: some past the groups in every case; not a multiple of the row tile
    lhs = rng.normal(size=(m, k)).astype(np.float32)
    rhs = rng.normal(size=(len(sizes), k, n)).astype(np.float32)
    w = rng.normal(size=(m, n)).astype(np.float32)
    gs = jnp.asarray(sizes, jnp.int32)

    def loss(lhs, rhs):
        return jnp.sum(gm.grouped_matmul(lhs, rhs, gs, impl) * w)

    out = jax.jit(lambda a, b: gm.grouped_matmul(a, b, gs, impl))(lhs, rhs)
    np.testing.assert_allclose(out, _reference(lhs, rhs, sizes), rtol=1e-5, atol=1e-5)
    d_lhs, d_rhs = jax.jit(jax.grad(loss, (0, 1)))(lhs, rhs)
    # The same loss by hand: d lhs[r] = w[r] @ rhs[g].T in a group, 0 past them; d rhs[g] = lhs[g rows].T @ w[g rows]
    ends = np.cumsum(sizes)
    want_lhs, want_rhs = np.zeros_like(lhs), np.zeros_like(rhs)
    for g, (lo, hi) in enumerate(zip(ends - np.asarray(sizes), ends)):
        want_lhs[lo:hi] = w[lo:hi] @ rhs[g].T
        want_rhs[g] = lhs[lo:hi].T @ w[lo:hi]
    np.testing.assert_allclose(d_lhs, want_lhs, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(d_rhs, want_rhs, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("impl", gm.IMPLS)
def test_all_rows_grouped_skips_the_masks_and_gives_the_same_result(impl):
    rng = np.random.default_rng(3)
    lhs = jnp.asarray(rng.normal(size=(20, 8)), jnp.float32)
    rhs = jnp.asarray(rng.normal(size=(3, 8, 5)), jnp.float32)
    gs = jnp.asarray([7, 0, 13], jnp.int32)
    np.testing.assert_allclose(gm.grouped_matmul(lhs, rhs, gs, impl, all_rows_grouped=True),
                               _reference(np.asarray(lhs), np.asarray(rhs), (7, 0, 13)), rtol=1e-5, atol=1e-5)


def test_tiles_fit_the_dims():
    assert gm.megablox_tiling(4096, 4096, 14336) == (512, 1024, 1024)
    assert gm.megablox_tiling(64, 16, 24) == (64, 16, 24)


def test_unknown_impl_is_named():
    with pytest.raises(ValueError, match="megablox"):
        gm.grouped_matmul(jnp.ones((2, 2)), jnp.ones((1, 2, 2)), jnp.ones((1,), jnp.int32), "dense")
