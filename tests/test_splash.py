"""jsmaug/models/splash.py: the Pallas TPU splash kernel (interpret mode on CPU) under a mesh, and the shapes it pads.
(Its values and gradients against `xla` in every mask case are in tests/test_attention.py.)"""

import numpy as np

import jax
import jax.numpy as jnp

from jsmaug.models import attention, splash

from jsmaug.parallel import mesh_context, sharding as shd

RNG = np.random.default_rng(1)


def _segments(b, s):
    seg = np.ones((b, s), np.int32)
    seg[0, s // 2:] = 2  # two packed segments in row 0
    seg[-1, s - s // 4:] = 0  # right padding in the last row
    return jnp.asarray(seg)


def test_splash_under_a_mesh_equals_xla():
    # 8 fake devices: rows over data, heads over tensor=4, 2 kv heads (do not split over 4: repeated per head).
    mesh = shd.make_mesh(shd.MeshConfig(data=2, tensor=4), devices=jax.devices())
    b, s, h, kv, dh = 4, 40, 4, 2, 8
    q = jnp.asarray(RNG.normal(size=(b, s, h, dh)), jnp.float32)
    k = jnp.asarray(RNG.normal(size=(b, s, kv, dh)), jnp.float32)
    v = jnp.asarray(RNG.normal(size=(b, s, kv, dh)), jnp.float32)
    seg = jnp.concatenate([_segments(2, s), _segments(2, s)[::-1]])
    real = (seg > 0)[:, :, None, None]

    def f(q, k, v):
        with mesh_context.mesh_scope(mesh, ("data", "fsdp", "expert")):
            return jnp.where(real, splash.splash_attention(q, k, v, seg, None, 128), 0.0)

    got = jax.jit(f)(q, k, v)
    ref = jnp.where(real, attention.xla_attention(q, k, v, attention.mask_BxSxT(seg, None)), 0.0)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_head_dim_and_length_are_padded_to_the_lanes_and_cut_back():
    b, s, h, kv, dh = 1, 130, 2, 1, 72  # length past one 128 block, head_dim not a multiple of 128
    q = jnp.asarray(RNG.normal(size=(b, s, h, dh)), jnp.float32)
    k = jnp.asarray(RNG.normal(size=(b, s, kv, dh)), jnp.float32)
    v = jnp.asarray(RNG.normal(size=(b, s, kv, dh)), jnp.float32)
    seg = jnp.ones((b, s), jnp.int32)
    got = splash.splash_attention(q, k, v, seg, None, 128, interpret=True)
    assert got.shape == (b, s, h, dh)
    np.testing.assert_allclose(got, attention.xla_attention(q, k, v, attention.mask_BxSxT(seg, None)),
                               rtol=1e-5, atol=1e-5)
