"""Quantized storage (jsmaug/models/quant.py) against a NumPy reference of each format, bit patterns included."""

import statistics

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jsmaug.models import quant


def _nf4_levels_from_the_paper():
    """QLoRA's construction: 8 positive and 7 negative quantiles of N(0, 1) between offset and 1/2, plus 0,
    divided by the largest (offset 0.9677083 = 1/2 (1/32 + 1/30) below 1, as in the paper's code)."""
    ppf = statistics.NormalDist().inv_cdf
    offset = 0.9677083
    pos = [ppf(p) for p in np.linspace(offset, 0.5, 9)[:-1]]
    neg = [-ppf(p) for p in np.linspace(offset, 0.5, 8)[:-1]]
    v = np.sort(np.array(pos + [0.0] + neg))
    return v / v.max()


def _reference(w, fmt, axis, group):
    """(nibbles or int8 values, scales) by plain NumPy loops over the groups; float32 scales rounded to bf16."""
    w = np.moveaxis(np.asarray(w, np.float32), axis, -1)
    flat = w.reshape(-1, w.shape[-1])
    if fmt == "int8":
        s = np.abs(flat).max(-1, keepdims=True) / 127.0
        s = np.asarray(jnp.asarray(s, jnp.bfloat16).astype(jnp.float32))
        return np.clip(np.round(flat / s), -127, 127).astype(np.int8), s
    codes, scales = np.zeros(flat.shape, np.uint8), np.zeros((flat.shape[0], flat.shape[1] // group), np.float32)
    for r in range(flat.shape[0]):
        for g in range(flat.shape[1] // group):
            x = flat[r, g * group:(g + 1) * group]
            s = float(jnp.asarray(np.abs(x).max(), jnp.bfloat16).astype(jnp.float32))
            scales[r, g] = s
            for i, v in enumerate(x / s):
                if fmt == "nf4":
                    code = int(np.argmin(np.abs(quant.NF4_LEVELS - v)))
                else:
                    code = int(np.clip(np.round(v * 7), -7, 7)) + 8
                codes[r, g * group + i] = code
    return codes, scales


def test_nf4_levels_are_the_papers():
    np.testing.assert_allclose(quant.NF4_LEVELS, _nf4_levels_from_the_paper(), atol=2e-7)
    assert quant.NF4_LEVELS[7] == 0.0 and len(set(quant.NF4_LEVELS.tolist())) == 16


@pytest.mark.parametrize("fmt", ["nf4", "int4"])
@pytest.mark.parametrize("axis", [0, 1])
def test_4bit_codes_scales_and_bit_patterns_equal_numpy(fmt, axis):
    rng = np.random.default_rng(0)
    w = rng.normal(size=(32, 48)).astype(np.float32) * np.linspace(0.1, 3, 48, dtype=np.float32)
    q = quant.quantize(w, fmt, axis, group=16)
    codes, scales = _reference(w, fmt, axis, 16)
    # The packed bytes: value 2i in the low nibble, 2i + 1 in the high nibble, along the contracted axis.
    expect_bytes = (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)
    got = np.moveaxis(np.asarray(q.packed), axis, -1).reshape(expect_bytes.shape)
    assert q.packed.dtype == jnp.uint8
    np.testing.assert_array_equal(got, expect_bytes)
    np.testing.assert_array_equal(np.moveaxis(np.asarray(q.scales, np.float32), axis, -1).reshape(scales.shape),
                                  scales)
    # Dequantized: the level (or code - 8) / 7 times the group's scale.
    vals = quant.NF4_LEVELS[codes] if fmt == "nf4" else (codes.astype(np.float32) - 8) / 7
    expect = vals * np.repeat(scales, 16, axis=1)
    expect = np.moveaxis(expect.reshape(np.moveaxis(w, axis, -1).shape), -1, axis)
    np.testing.assert_allclose(np.asarray(q.dequantize()), expect, rtol=1e-6, atol=1e-7)


def test_int8_per_output_channel_equals_numpy():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(24, 10)).astype(np.float32)
    q = quant.quantize(w, "int8", 0)
    vals, scales = _reference(w, "int8", 0, 0)
    np.testing.assert_array_equal(np.asarray(q.packed).T, vals)
    np.testing.assert_allclose(np.asarray(q.dequantize()), (vals * scales).T, rtol=1e-6)
    assert q.scales.shape == (1, 10)


def test_packed_size_is_half_a_byte_per_weight_plus_the_scales():
    w = np.random.default_rng(2).normal(size=(2, 128, 64)).astype(np.float32)
    q = quant.quantize(w, "nf4", 1, group=64)
    assert q.packed.shape == (2, 64, 64) and q.scales.shape == (2, 2, 64)
    assert q.nbytes == w.size // 2 + 2 * 2 * 64 * 2  # uint8 pairs + bfloat16 scales
    assert quant.bits_per_weight(q) == pytest.approx(4.25)


def test_error_is_what_each_format_promises():
    w = np.random.default_rng(3).normal(size=(256, 128)).astype(np.float32)
    for fmt, bound in (("int8", 0.012), ("nf4", 0.11), ("int4", 0.13)):
        err = np.sqrt(np.mean((np.asarray(quant.quantize(w, fmt, 0).dequantize()) - w) ** 2))
        assert err < bound, (fmt, err)
    # A zero group stays zero (no division by zero), and exact levels survive.
    z = np.zeros((64, 2), np.float32)
    z[:, 1] = quant.NF4_LEVELS[np.arange(64) % 16] * 2.0
    np.testing.assert_allclose(np.asarray(quant.quantize(z, "nf4", 0).dequantize()), z, atol=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    (dict(fmt="nf4", axis=0, group=48), "does not divide"),
    (dict(fmt="fp3", axis=0, group=64), "unknown quantization format 'fp3'"),
    (dict(fmt="nf4", axis=3, group=64), "outside"),
    (dict(fmt="int4", axis=0, group=7), "even number"),
])
def test_bad_settings_name_the_weight(kwargs, match):
    with pytest.raises(quant.QuantError, match=match) as err:
        quant.quantize(np.ones((128, 4), np.float32), name="layers.0.q_proj", **kwargs)
    assert "layers.0.q_proj" in str(err.value)


@pytest.mark.parametrize("fmt", ["nf4", "int8"])  # int4 shares nf4's nibble path
def test_take_rows_gathers_packed_rows_and_equals_the_full_dequantize(fmt):
    """An embedding (V, D) quantized along D: the looked-up rows, bit for bit the rows of the whole table
    dequantized, and the look-up's program holds nothing of the table's size in float (only the gathered rows
    are dequantized)."""
    v, d = 96, 32
    w = np.random.default_rng(4).normal(size=(v, d)).astype(np.float32)
    q = quant.quantize(w, fmt, 1, group=8)
    ids = np.array([[5, 0, 95, 5], [17, 17, 3, 60]], np.int32)
    got = np.asarray(quant.take_rows(q, ids))
    assert got.shape == (2, 4, d)
    np.testing.assert_array_equal(got, np.asarray(quant.dequantize(q))[ids])
    jaxpr = jax.make_jaxpr(lambda q, i: quant.take_rows(q, i))(q, ids)
    floats = [a.aval for e in jaxpr.eqns for a in e.outvars if jnp.issubdtype(a.aval.dtype, jnp.floating)]
    assert floats and max(a.size for a in floats) <= ids.size * d  # never (V, D) in float
    with pytest.raises(quant.QuantError, match="another axis than 0"):
        quant.take_rows(quant.quantize(w, fmt, 0, group=8), ids)
