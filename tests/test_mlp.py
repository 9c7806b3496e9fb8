"""The dense MLP's gated activation (`mlp.gated`, a hand-written backward that keeps only the two
pre-activations): its value is HF's act(gate) * up exactly, and its gradients equal autodiff of that expression
for SwiGLU (silu) and Gemma's GeGLU (tanh GELU), in float32 and bfloat16."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jsmaug.models import mlp


@pytest.mark.parametrize("name", ["silu", "gelu_pytorch_tanh"])
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-6), (jnp.bfloat16, 2e-2)])
def test_gated_value_and_gradients_equal_autodiff_of_act_times_up(name, dtype, tol):
    k = jax.random.split(jax.random.key(0), 3)
    gate = (3.0 * jax.random.normal(k[0], (6, 40))).astype(dtype)  # the GELU's tanh saturates past |p| ~ 3
    up, g = (jax.random.normal(kk, (6, 40)).astype(dtype) for kk in k[1:])
    plain = lambda a, b: mlp.activation(name)(a) * b  # noqa: E731
    want, want_vjp = jax.vjp(plain, gate, up)
    got, got_vjp = jax.vjp(lambda a, b: mlp.gated(name, a, b), gate, up)
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    for a, b in zip(got_vjp(g), want_vjp(g)):
        assert a.dtype == dtype
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        np.testing.assert_allclose(a, b, atol=tol * np.abs(b).max(), rtol=0)
