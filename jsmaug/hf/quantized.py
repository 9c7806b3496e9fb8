"""`jsmaug convert --quantize`: the frozen base of a QLoRA run, quantized while the HF tensors are read.

`read.load(..., quantize=fmt)` asks `lora.quantize_base` (traced with `jax.eval_shape`, so nothing is computed)
which leaves it would quantize and how (format, per-layer shape, contracted axis, group); every such leaf is then
quantized as it is read, one layer of a stacked leaf at a time, into preallocated packed and scale arrays. Host
memory holds one layer's float tensors and the packed model, never the whole float model. Each layer goes
through the same `quant.quantize` on the same float values as `quantize_base` applied to the whole unquantized
stack (groups never cross a layer, int8's absmax is per output channel), so the packed bits are identical.
"""

from __future__ import annotations

import functools
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from jsmaug.models import lora, quant


def abstract_leaves(shapes, fmt: str, group: int, embeddings: bool = True) -> dict[str, quant.QuantizedArray]:
    """{leaf path ("layers/layer/self_attn/q_proj"): abstract QuantizedArray} of every leaf `quantize_base` would
    quantize in a tree of ShapeDtypeStructs. Raises quant.QuantError naming the weight for a group that does not
    divide its contracted axis, before anything is read."""
    tree = jax.eval_shape(lambda p: lora.quantize_base(p, fmt, group, embeddings), shapes)
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=quant.is_quantized)[0]
    return {"/".join(str(k.key) for k in path): q for path, q in flat if quant.is_quantized(q)}


@functools.lru_cache(maxsize=None)
def _quantizer(fmt: str, axis: int, group: int):
    # One jitted function per (format, axis, group), shared by every leaf of the same shape (one compile each);
    # the shapes were checked by `abstract_leaves`, so the weight's name is not needed for an error here.
    return jax.jit(lambda w: quant.quantize(w, fmt, axis, group))


CHUNK_VALUES = 1 << 22  # values quantized per call: 16 MB of float32, with the quantizer's temporaries ~5x that


def _quantize_chunked(arr: np.ndarray, dtype, q_abs: quant.QuantizedArray) -> tuple[np.ndarray, np.ndarray]:
    """(packed, scales) of one whole weight as NumPy arrays, quantized CHUNK_VALUES at a time along its longest
    axis other than the quantized one: the groups (and int8's channels) never cross that axis, so the bits are
    those of quantizing the weight at once, but the quantizer's float temporaries stay at a chunk's size (a
    32000 x 4096 embedding table would otherwise need several float32 copies of itself)."""
    arr = np.asarray(arr).astype(dtype, copy=False)
    quantize = _quantizer(q_abs.fmt, q_abs.axis, q_abs.group)
    others = [i for i in range(arr.ndim) if i != q_abs.axis]
    if arr.size <= CHUNK_VALUES or not others:
        q = quantize(jnp.asarray(arr))
        return np.asarray(q.packed), np.asarray(q.scales)
    c = max(others, key=lambda i: arr.shape[i])
    step = max(1, arr.shape[c] * CHUNK_VALUES // arr.size)
    parts = [quantize(jnp.asarray(np.take(arr, np.arange(i, min(i + step, arr.shape[c])), axis=c)))
             for i in range(0, arr.shape[c], step)]
    return (np.concatenate([np.asarray(q.packed) for q in parts], axis=c),
            np.concatenate([np.asarray(q.scales) for q in parts], axis=c))


def quantize_leaf(arr: np.ndarray, dtype, q_abs: quant.QuantizedArray, sharding=None) -> quant.QuantizedArray:
    """A whole (unstacked) leaf, e.g. the embedding table: cast to the parameter dtype, then quantized."""
    packed, scales = _quantize_chunked(arr, dtype, q_abs)
    fitted = quant.fit_sharding(q_abs, sharding) if sharding is not None else None
    put = (lambda x, sh: jnp.asarray(x)) if fitted is None else jax.device_put
    return quant.QuantizedArray(put(packed, fitted and fitted.packed), put(scales, fitted and fitted.scales),
                                q_abs.fmt, q_abs.shape, q_abs.axis, q_abs.group)


def _update(buf, value, i):
    return jax.lax.dynamic_update_index_in_dim(buf, value, i, 0)


@functools.lru_cache(maxsize=None)
def layer_put(sharding=None):
    """put(buf, value, i): layer i of a stacked (L, ...) buffer set to `value`, the buffer donated, the result on
    `sharding`. One jitted function per sharding, shared by every leaf and every load (a new jit per leaf
    recompiled it each time: 160 of test_step's compiles). Also jsmaug/hf/read.py's float stacks."""
    return jax.jit(_update, donate_argnums=0, out_shardings=sharding)


@functools.lru_cache(maxsize=None)
def _zeros(shape, dtype, sharding):
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)


def zeros(shape, dtype, sharding=None):
    """A zero (L, ...) buffer, created on its shardings (cached per shape, dtype and sharding)."""
    return jnp.zeros(shape, dtype) if sharding is None else _zeros(tuple(shape), jnp.dtype(dtype), sharding)()


def stack_quantized(layers: Iterator[np.ndarray], dtype, q_abs: quant.QuantizedArray, name: str,
                    sharding=None) -> quant.QuantizedArray:
    """A stacked (L, ...) leaf from its layers, each cast to the parameter dtype and quantized alone along its
    contracted axis (`q_abs.axis`, per layer: `quant.unstack`'s view) into preallocated (L, ...) packed values and
    scales (donated updates): host memory holds one float layer and the packed stack."""
    lead = q_abs.packed.ndim - len(q_abs.shape)
    fitted = quant.fit_sharding(q_abs, sharding) if sharding is not None else None
    bufs, puts = [], []
    for part in ("packed", "scales"):
        sds, sh = getattr(q_abs, part), (getattr(fitted, part) if fitted is not None else None)
        bufs.append(zeros(sds.shape, sds.dtype, sh))
        puts.append(layer_put(sh))
    n = 0
    for i, layer in enumerate(layers):
        bufs = [put(buf, jnp.asarray(v), i) for put, buf, v in zip(puts, bufs, _quantize_chunked(layer, dtype, q_abs))]
        n += 1
    if lead != 1 or n != q_abs.packed.shape[0]:  # pragma: no cover - param_shapes and the layout agree
        raise ValueError(f"{name}: built {n} layers of a stack of {q_abs.packed.shape[:lead]}")
    return quant.QuantizedArray(bufs[0], bufs[1], q_abs.fmt, q_abs.shape, q_abs.axis, q_abs.group)
