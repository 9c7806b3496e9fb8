"""Quantized storage for a frozen base: int8 per output channel, and NF4 / int4 in groups along the contracted axis.

A weight W whose contracted (input) axis is `axis` is stored as

    int8:  q = round(W / s) in [-127, 127] (one int8 per value), s = absmax(W over `axis`) / 127
           one scale per output channel (every index of the other axes)
    nf4:   the QLoRA paper's 16 levels (arXiv 2305.14314, appendix E: quantiles of N(0, 1) normalised to [-1, 1],
           zero exact); each group of `group` consecutive values along `axis` is divided by its absmax s and
           every value becomes the index of its nearest level
    int4:  the same groups, q = round(W / s * 7) in [-7, 7], stored with an offset of 8

The 4-bit formats pack two values per uint8 along `axis` (value 2i in the low nibble, 2i + 1 in the high one), so
4 bits really cost half a byte in memory and in a checkpoint; scales have the shape of W with `axis` divided by
the group. Dequantizing is a table look-up (nf4) or an offset (int4), times the broadcast scale, in float32, then
cast to the compute dtype: the matmul that follows runs as it would on the unquantized weight.

Scales are stored in bfloat16, not float32, and not double-quantized (QLoRA's second 8-bit quantization of the
scales). Measured with `python -m jsmaug.models.quant` (Gaussian weights, 4096 x 4096, group 64, this CPU,
2026-12-06): the RMS error relative to the weight's RMS is the same to 4 digits with either scale dtype (NF4
0.0920, int4 0.1076, int8 0.0087: bfloat16 rounds each scale by at most 2^-9 relative, invisible beside the
4-bit rounding), while NF4's storage falls from 4.50 to 4.25 bits a weight. Double quantization would save 0.127 more bits a weight
(under 3% of an NF4 base) for a second look-up in every matmul; not worth it here.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

FORMATS = ("int8", "nf4", "int4")
DEFAULT_GROUP = 64

# NF4's 16 levels, as the QLoRA paper defines them (bitsandbytes' `create_normal_map(offset=0.9677083)`):
# 8 positive quantiles of N(0, 1), 7 negative, and an exact zero, divided by the largest.
NF4_LEVELS = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], np.float32)


class QuantError(ValueError):
    """A quantization setting or weight that cannot be quantized as asked (names the weight and the setting)."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedArray:
    """A weight in quantized storage: `packed` (uint8 / int8) and `scales` are the pytree's leaves; the format,
    the original shape and dtype, the contracted axis and the group size are static."""

    packed: jax.Array
    scales: jax.Array
    fmt: str = dataclasses.field(metadata=dict(static=True))
    shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    axis: int = dataclasses.field(metadata=dict(static=True))
    group: int = dataclasses.field(metadata=dict(static=True))

    @property
    def nbytes(self) -> int:
        return int(self.packed.size * self.packed.dtype.itemsize + self.scales.size * self.scales.dtype.itemsize)

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        return dequantize(self, dtype)


def _check(shape, fmt: str, axis: int, group: int, name: str) -> int:
    if fmt not in FORMATS:
        raise QuantError(f"{name}: unknown quantization format {fmt!r}; known: {', '.join(FORMATS)}")
    if not -len(shape) <= axis < len(shape):
        raise QuantError(f"{name}: axis {axis} is outside a weight of shape {tuple(shape)}")
    axis %= len(shape)
    if fmt != "int8":
        k = shape[axis]
        if group < 2 or group % 2:
            raise QuantError(f"{name}: the group size must be an even number >= 2, got {group}")
        if k % group:
            raise QuantError(f"{name}: group size {group} does not divide the contracted axis {axis} of length {k} "
                             f"(shape {tuple(shape)}); pick a group that divides {k}")
    return axis


def _grouped(x, axis: int, group: int):
    """x with `axis` split into (groups, group): (..., K, ...) -> (..., K / group, group, ...)."""
    return x.reshape(*x.shape[:axis], x.shape[axis] // group, group, *x.shape[axis + 1:])


def _pack(nibbles, axis: int):
    """uint8 values < 16, two per byte along `axis`: value 2i in the low nibble, 2i + 1 in the high one."""
    pairs = nibbles.reshape(*nibbles.shape[:axis], nibbles.shape[axis] // 2, 2, *nibbles.shape[axis + 1:])
    lo, hi = jnp.take(pairs, 0, axis=axis + 1), jnp.take(pairs, 1, axis=axis + 1)
    return (lo | (hi << 4)).astype(jnp.uint8)


def _unpack(packed, axis: int):
    lo, hi = packed & 0xF, packed >> 4
    both = jnp.stack([lo, hi], axis=axis + 1)
    return both.reshape(*packed.shape[:axis], packed.shape[axis] * 2, *packed.shape[axis + 1:])


def quantize(w, fmt: str, axis: int, group: int = DEFAULT_GROUP, scale_dtype=jnp.bfloat16,
             name: str = "weight") -> QuantizedArray:
    """W in `fmt` storage, groups (or, for int8, whole channels) along its contracted axis `axis`."""
    axis = _check(w.shape, fmt, axis, group, name)
    wf = jnp.asarray(w, jnp.float32)
    if fmt == "int8":
        absmax = jnp.max(jnp.abs(wf), axis=axis, keepdims=True)
        scale = (jnp.where(absmax > 0, absmax, 1.0) / 127.0).astype(scale_dtype)
        q = jnp.clip(jnp.round(wf / scale.astype(jnp.float32)), -127, 127).astype(jnp.int8)
        return QuantizedArray(q, scale, fmt, tuple(w.shape), axis, 0)
    g = _grouped(wf, axis, group)
    absmax = jnp.max(jnp.abs(g), axis=axis + 1, keepdims=True)
    scale = jnp.where(absmax > 0, absmax, 1.0).astype(scale_dtype)
    x = g / scale.astype(jnp.float32)  # in [-1, 1] up to the scale's rounding
    if fmt == "nf4":
        levels = jnp.asarray(NF4_LEVELS)
        # Nearest level: the index of the first midpoint above x (ties go up, as bitsandbytes' thresholds do).
        idx = jnp.searchsorted((levels[1:] + levels[:-1]) / 2, x, side="right")
    else:
        idx = jnp.clip(jnp.round(x * 7), -7, 7) + 8
    nibbles = idx.astype(jnp.uint8).reshape(w.shape)
    return QuantizedArray(_pack(nibbles, axis), jnp.squeeze(scale, axis + 1), fmt, tuple(w.shape), axis, group)


def dequantize(q: QuantizedArray, dtype=jnp.float32) -> jax.Array:
    """The weight back in `dtype`: look-up (nf4) or offset (int4), times the scale, in float32.

    The leaves may carry leading axes that the static `shape` does not list (a stack of layers, `unstack`): a
    `lax.scan` over the stack then hands each layer an ordinary QuantizedArray of the per-layer shape."""
    lead = q.packed.ndim - len(q.shape)
    axis, shape = q.axis + lead, (*q.packed.shape[:lead], *q.shape)
    scales = q.scales.astype(jnp.float32)
    if q.fmt == "int8":
        return (q.packed.astype(jnp.float32) * scales).astype(dtype)
    idx = _unpack(q.packed, axis)
    vals = jnp.asarray(NF4_LEVELS)[idx] if q.fmt == "nf4" else idx.astype(jnp.float32) - 8.0
    if q.fmt == "int4":
        vals = vals / 7.0
    g = _grouped(vals, axis, q.group) * jnp.expand_dims(scales, axis + 1)
    return g.reshape(shape).astype(dtype)


def take_rows(q: QuantizedArray, ids, dtype=jnp.float32) -> jax.Array:
    """`dequantize(q, dtype)[ids]` (rows of axis 0, e.g. an embedding look-up), from the gathered packed rows and
    their scales only: the whole table is never dequantized. Needs the quantized axis to be another axis than the
    rows' (an embedding (V, D) is quantized along D); the result is bit for bit the rows of the full dequantize
    (the same element-wise look-up, product and cast)."""
    if q.packed.ndim != len(q.shape) or q.axis == 0:
        raise QuantError(f"take_rows: a weight of shape {q.shape} quantized along axis {q.axis} (stored "
                         f"{q.packed.shape}): rows can be gathered only from an unstacked weight quantized along "
                         f"another axis than 0")
    ids = jnp.asarray(ids)
    rows = dataclasses.replace(q, packed=jnp.take(q.packed, ids, axis=0), scales=jnp.take(q.scales, ids, axis=0),
                               shape=q.shape[1:], axis=q.axis - 1)
    return dequantize(rows, dtype)  # the gathered leading axes are dequantize's stack axes


def unstack(q: QuantizedArray, lead: int) -> QuantizedArray:
    """`q` of a stack of weights (its first `lead` axes index layers) described per weight: the static shape and
    axis of one layer's weight, as a scan over the stack sees it."""
    return dataclasses.replace(q, shape=q.shape[lead:], axis=q.axis - lead)


def fit_sharding(q_abstract: QuantizedArray, sharding) -> QuantizedArray:
    """Shardings for the leaves of a quantized weight whose unquantized form shards as `sharding` (a
    NamedSharding): the packed values and the scales keep the weight's spec, axis by axis, except where their
    (halved, or divided by the group) length no longer divides the mesh axes: that axis is left whole."""
    from jax.sharding import NamedSharding, PartitionSpec

    mesh, spec = sharding.mesh, tuple(sharding.spec)

    def fit(sds):
        out = []
        for i, n in enumerate(sds.shape):
            ax = spec[i] if i < len(spec) else None
            names = () if ax is None else (ax if isinstance(ax, tuple) else (ax,))
            out.append(ax if n % math.prod(mesh.shape[a] for a in names) == 0 else None)
        return NamedSharding(mesh, PartitionSpec(*out))

    return dataclasses.replace(q_abstract, packed=fit(q_abstract.packed), scales=fit(q_abstract.scales))


def is_quantized(x) -> bool:
    return isinstance(x, QuantizedArray)


def bits_per_weight(q: QuantizedArray) -> float:
    return 8 * q.nbytes / math.prod(q.shape)


def _measure():  # the figures in the module docstring
    w = jax.random.normal(jax.random.key(0), (4096, 4096), jnp.float32)
    rms = float(jnp.sqrt(jnp.mean(w * w)))
    for dt in (jnp.float32, jnp.bfloat16):
        for fmt in FORMATS:
            q = quantize(w, fmt, 0, scale_dtype=dt)
            err = float(jnp.sqrt(jnp.mean((dequantize(q) - w) ** 2))) / rms
            print(f"{fmt:5s} scales {jnp.dtype(dt).name:8s}: relative RMS error {err:.4f}, "
                  f"{bits_per_weight(q):.3f} bits a weight")


if __name__ == "__main__":
    _measure()
