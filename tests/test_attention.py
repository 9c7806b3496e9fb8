"""Attention paths: `chunked` and `splash` (interpret mode) equal `xla` (values and gradients) with padding, packing, a sliding window,
GQA/MQA and odd lengths; its compiled temporaries grow about linearly with the length; `auto`'s choices."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jsmaug.models import attention, splash

RNG = np.random.default_rng(0)


def _segments(b, s):
    seg = np.ones((b, s), np.int32)
    if b > 1:
        seg[0, s // 3: 2 * s // 3] = 2  # three packed segments in row 0
        seg[0, 2 * s // 3:] = 3
        seg[1, s - s // 5:] = 0  # right padding in row 1
    return jnp.asarray(seg)


CASES = {  # b, s, heads, kv heads, head_dim, window, block
    "gqa_packed_padded": (2, 37, 4, 2, 8, None, 8),
    "mqa_window": (2, 37, 4, 1, 8, 5, 8),
    "mha_window_odd_head_dim": (2, 45, 3, 3, 6, 16, 16),
    "one_block_longer_than_s": (2, 20, 4, 2, 8, None, 64),
    "window_over_several_blocks": (2, 300, 4, 2, 8, 130, 64),
}


PATHS = {
    "chunked": attention.chunked_attention,
    # The Pallas TPU kernel in interpret mode: the same kernel code that runs on TPU, executed on CPU.
    "splash": lambda q, k, v, seg, window, block: splash.splash_attention(q, k, v, seg, window, 128, interpret=True),
    # The cudnn path's own logic (segment ids -> lengths, the window, packed rows -> chunked via lax.cond) with
    # jax.nn.dot_product_attention's XLA implementation in place of the cuDNN kernel, which needs a GPU.
    "cudnn_logic": lambda q, k, v, seg, window, block: attention.cudnn_attention(q, k, v, seg, window, block,
                                                                               fused_impl="xla"),
}


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("name", sorted(CASES))
def test_path_equals_xla_in_values_and_gradients(name, path):
    b, s, h, kv, dh, window, block = CASES[name]
    q = jnp.asarray(RNG.normal(size=(b, s, h, dh)), jnp.float32)
    k = jnp.asarray(RNG.normal(size=(b, s, kv, dh)), jnp.float32)
    v = jnp.asarray(RNG.normal(size=(b, s, kv, dh)), jnp.float32)
    w = jnp.asarray(RNG.normal(size=(b, s, h, dh)), jnp.float32)
    seg = _segments(b, s)
    real = (seg > 0)[:, :, None, None]  # padding queries see nothing: their outputs are not compared

    def loss(fn):
        return lambda q, k, v: jnp.sum(jnp.where(real, fn(q, k, v), 0.0) * w)

    ref = loss(lambda q, k, v: attention.xla_attention(q, k, v, attention.mask_BxSxT(seg, window)))
    got = loss(lambda q, k, v: PATHS[path](q, k, v, seg, window, block))
    lr, gr = jax.jit(jax.value_and_grad(ref, (0, 1, 2)))(q, k, v)
    lg, gg = jax.jit(jax.value_and_grad(got, (0, 1, 2)))(q, k, v)
    np.testing.assert_allclose(lg, lr, rtol=1e-5, atol=1e-5)
    for a, b_ in zip(gg, gr):
        np.testing.assert_allclose(a, b_, rtol=1e-5, atol=1e-5)


def _grad_temp_bytes(impl, s):
    q = jax.ShapeDtypeStruct((1, s, 4, 32), jnp.float32)
    kv = jax.ShapeDtypeStruct((1, s, 2, 32), jnp.float32)
    seg = jax.ShapeDtypeStruct((1, s), jnp.int32)

    def f(q, k, v, seg):
        out = attention.self_attention(q, k, v, seg, implementation=impl, block_size=256)
        return jnp.sum(out * out)

    compiled = jax.jit(jax.grad(f, (0, 1, 2))).lower(q, kv, kv, seg).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_chunked_memory_grows_linearly_and_xla_quadratically():
    c1, c4 = _grad_temp_bytes("chunked", 1024), _grad_temp_bytes("chunked", 4096)
    x4 = _grad_temp_bytes("xla", 4096)
    print(f"chunked 1024 -> 4096: {c4 / c1:.2f}x; xla / chunked at 4096: {x4 / c4:.1f}x")
    assert c4 / c1 <= 6.0, (c1, c4)
    assert x4 / c4 >= 4.0, (x4, c4)


def test_auto_choices_per_backend():
    assert attention.resolve_impl("auto", "float32", 128, "cpu")[0] == "chunked"  # length unknown
    assert attention.resolve_impl("auto", "float32", 128, "cpu", seq_len=512, block_size=512)[0] == "xla"
    assert attention.resolve_impl("auto", "float32", 128, "cpu", seq_len=520, block_size=512)[0] == "chunked"
    assert attention.resolve_impl("auto", "float32", 128, "gpu", seq_len=64)[0] == "chunked"  # CPU only
    assert attention.resolve_impl("auto", "bfloat16", 128, "gpu")[0] == "cudnn"
    assert attention.resolve_impl("auto", "float32", 128, "gpu")[0] == "chunked"  # cuDNN needs bf16/fp16
    assert attention.resolve_impl("auto", "bfloat16", 512, "gpu")[0] == "chunked"  # head_dim > 256
    assert attention.resolve_impl("auto", "bfloat16", 128, "tpu")[0] == "splash"
    assert attention.resolve_impl("splash", "bfloat16", 128, "gpu")[0] == "chunked"  # a TPU kernel
    assert attention.resolve_impl("splash", "float32", 128, "cpu")[0] == "splash"  # interpret mode, for tests
    assert attention.resolve_impl("cudnn", "bfloat16", 128, "cpu")[0] == "chunked"  # falls back, says why
    assert attention.resolve_impl("xla", "float32", 128, "cpu") == ("xla", "set in the config")


def test_chunked_runs_blocks_of_at_most_256_on_cpu(monkeypatch):
    """The CPU cap on `chunked`'s block (attention.CPU_CHUNK_BLOCK, chosen by jsmaug.perf.attention_blocks): a
    512-token block runs as 256 on CPU and stays 512 elsewhere; a smaller block stays; the values do not move."""
    assert (attention.chunk_block(512, "cpu"), attention.chunk_block(64, "cpu")) == (256, 64)
    assert attention.chunk_block(512, "gpu") == attention.chunk_block(512, "tpu") == 512
    assert "blocks of 256" in attention.resolve_impl("auto", "float32", 64, "cpu", seq_len=1024, block_size=512)[1]
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(1, 600, h, 16)).astype(np.float32)) for h in (4, 2, 2))
    seg = jnp.asarray(np.repeat([1, 2, 3], 200)[None].astype(np.int32))
    seen, shipped = [], attention.chunked_attention

    def spy(*a, **kw):
        seen.append(a[5])  # the block
        return shipped(*a, **kw)
    monkeypatch.setattr(attention, "chunked_attention", spy)
    got = attention.self_attention(q, k, v, seg, implementation="chunked", block_size=512)
    assert seen == [256]
    want = attention.xla_attention(q, k, v, attention.mask_BxSxT(seg, None))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)



def test_cudnn_logic_takes_the_fused_call_for_padded_rows_and_chunked_for_packed_ones(monkeypatch):
    # Rows that are one segment then padding go to the fused call; a packed row sends the batch to `chunked`.
    # The fused call is replaced by one that returns zeros, so the output says which branch ran.
    b, s, h, kv, dh = 2, 24, 4, 2, 8
    q = jnp.asarray(RNG.normal(size=(b, s, h, dh)), jnp.float32)
    k = jnp.asarray(RNG.normal(size=(b, s, kv, dh)), jnp.float32)
    v = jnp.asarray(RNG.normal(size=(b, s, kv, dh)), jnp.float32)
    padded = jnp.asarray(np.r_[[np.ones(s)], [np.r_[np.ones(s - 5), np.zeros(5)]]], jnp.int32)
    real = (padded > 0)[:, :, None, None]
    for window in (None, 7):  # the fused call's lengths, causal flag and local window mean what xla's mask means
        got = attention.cudnn_attention(q, k, v, padded, window, 8, fused_impl="xla")
        want = attention.xla_attention(q, k, v, attention.mask_BxSxT(padded, window))
        np.testing.assert_allclose(jnp.where(real, got, 0), jnp.where(real, want, 0), rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(jax.nn, "dot_product_attention", lambda q, *a, **kw: jnp.zeros_like(q))
    assert float(jnp.abs(attention.cudnn_attention(q, k, v, padded, 7, 8, fused_impl="xla")).max()) == 0.0
    packed = _segments(b, s)
    got = attention.cudnn_attention(q, k, v, packed, 7, 8, fused_impl="xla")
    real = (packed > 0)[:, :, None, None]
    want = attention.xla_attention(q, k, v, attention.mask_BxSxT(packed, 7))
    np.testing.assert_allclose(jnp.where(real, got, 0), jnp.where(real, want, 0), rtol=1e-5, atol=1e-5)
