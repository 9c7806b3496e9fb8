"""Shared numerical checks for the loss tests."""

import numpy as np

import jax
import jax.numpy as jnp


def check_grads_by_finite_differences(total, base, eps=1e-6, rtol=1e-5, atol=1e-7, label=""):
    """`total(*arrays)` (float64, enable x64 first): the gradients on the first two arrays (the policy's chosen and
    rejected log-probs) equal central differences, and the last two (the reference's) get none."""
    grads = jax.grad(total, argnums=tuple(range(len(base))))(*(jnp.asarray(a, jnp.float64) for a in base))
    for argi in (0, 1):
        fd = np.zeros(len(base[argi]))
        for i in range(len(fd)):
            up = [a.copy() for a in base]
            up[argi][i] += eps
            dn = [a.copy() for a in base]
            dn[argi][i] -= eps
            fd[i] = (float(total(*map(jnp.asarray, up))) - float(total(*map(jnp.asarray, dn)))) / (2 * eps)
        np.testing.assert_allclose(grads[argi], fd, rtol=rtol, atol=atol, err_msg=f"{label} arg {argi}")
    assert not np.any(np.asarray(grads[2])) and not np.any(np.asarray(grads[3])), f"{label}: the reference moved"
