"""A frozen weight with its low-rank adapter, used without ever forming their sum:

    x @ Factored(W, A, B, s)  =  x @ W + s * (x @ A) @ B          W: (*batch, in, out)  A: (*batch, in, r)
                                                                   B: (*batch, r, out)

LoRA's `W + s * A @ B` (jsmaug/models/lora.py) is exact but costs, per layer, a second whole weight in the
forward and the gradient of the whole effective weight in the backward (dA = s * dW_eff @ B^T), which is then
projected onto the rank-r factors. For Mixtral-8x7B's eight experts that is 2 x 2.7 GiB of temporaries per layer
beside the (dequantized) base, and it is what kept 8x7B QLoRA off a v5e-8 (docs/planning.md). Used factored, the
adapter costs two thin matmuls through an (rows, r) intermediate, and the backward never holds a weight-sized
gradient: dA = s * x^T (dy B^T), dB = s * (x A)^T dy.

The MLP and every MoE dispatch path take a `Factored` wherever they take a weight: `x @ w` (`__rmatmul__`),
`w[e]` and `w.astype`, `einsum` below for the einsum-written paths, `weight_grad` for the hand-written VJP of
the bucketed path, and `map_parts` for what shards or gathers a weight (the all_to_all dispatch). The base is
frozen: `weights.weight` builds a Factored from a stop-gradient base, and `weight_grad` gives it a zero gradient.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Factored:
    """W (frozen) with the adapter s * A @ B, applied factored. W may have leading batch (expert) axes."""
    w: Any
    a: Any
    b: Any
    scale: float = dataclasses.field(metadata=dict(static=True))

    @property
    def shape(self):
        return self.w.shape

    @property
    def dtype(self):
        return self.w.dtype

    @property
    def ndim(self):
        return self.w.ndim

    def astype(self, dtype):
        return Factored(self.w.astype(dtype), self.a.astype(dtype), self.b.astype(dtype), self.scale)

    def __getitem__(self, index):
        """Indexes the leading batch axes (an expert, or a gather of experts per block) of all three."""
        return Factored(self.w[index], self.a[index], self.b[index], self.scale)

    def __rmatmul__(self, x):
        return x @ self.w + self.low_rank(x)

    def low_rank(self, x):
        """s * (x @ A) @ B: the (rows, r) intermediate is scaled, not the (rows, out) result."""
        return ((x @ self.a) * jnp.asarray(self.scale, x.dtype)) @ self.b


def is_factored(w) -> bool:
    return isinstance(w, Factored)


def _spare_letter(spec: str) -> str:
    return next(c for c in "rzyxwvutsqponmlkjihgfedcba" if c not in spec)


def einsum(spec: str, x, w):
    """`jnp.einsum(spec, x, w)` for a weight whose last two letters in `spec` are its (in, out) axes. A Factored
    `w` gives x·W + s (x·A)·B. The contracted letter may be `in` (y = x W) or `out` (x W^T: a backward)."""
    if not is_factored(w):
        return jnp.einsum(spec, x, w)
    ins, out = spec.split("->")
    xs, ws = ins.split(",")
    batch, i, o = ws[:-2], ws[-2], ws[-1]
    r = _spare_letter(spec)
    scale = jnp.asarray(w.scale, x.dtype)
    if i not in out:  # y = x W
        mid = out.replace(o, r)
        m = jnp.einsum(f"{xs},{batch}{i}{r}->{mid}", x, w.a) * scale
        delta = jnp.einsum(f"{mid},{batch}{r}{o}->{out}", m, w.b)
    else:  # y = x W^T
        mid = out.replace(i, r)
        m = jnp.einsum(f"{xs},{batch}{r}{o}->{mid}", x, w.b) * scale
        delta = jnp.einsum(f"{mid},{batch}{i}{r}->{out}", m, w.a)
    return jnp.einsum(spec, x, w.w) + delta


def weight_grad(batch: str, x, dy, w):
    """The cotangent of `w` in y = x W, from x (*batch, c, in) and dy (*batch, c, out), `batch` the letters of
    the leading axes. A Factored `w` gets dA = s x^T (dy B^T) and dB = s (x A)^T dy and no base part (None:
    `with_frozen_base` gives it its zero once the per-block gradients are summed), never a weight-sized product."""
    if not is_factored(w):
        return jnp.einsum(f"{batch}ci,{batch}co->{batch}io", x, dy)
    scale = jnp.asarray(w.scale, x.dtype)
    dyb = jnp.einsum(f"{batch}co,{batch}ro->{batch}cr", dy, w.b) * scale
    xa = jnp.einsum(f"{batch}ci,{batch}ir->{batch}cr", x, w.a) * scale
    da = jnp.einsum(f"{batch}ci,{batch}cr->{batch}ir", x, dyb)
    db = jnp.einsum(f"{batch}cr,{batch}co->{batch}ro", xa, dy)
    return Factored(None, da.astype(w.a.dtype), db.astype(w.b.dtype), w.scale)


def with_frozen_base(grad, w):
    """A `weight_grad` cotangent of `w` completed with the zero of a Factored's frozen base."""
    if not is_factored(w):
        return grad
    return Factored(jnp.zeros_like(w.w), grad.a, grad.b, w.scale)


def map_parts(w, fn_w, fn_a=None, fn_b=None):
    """fn_w(w) for a plain weight; for a Factored, each part through its own function (None: unchanged). Used for
    what shards, gathers or describes a weight: A has W's in axis and no out axis, B the reverse."""
    if not is_factored(w):
        return fn_w(w)
    keep = lambda v: v  # noqa: E731
    return Factored(fn_w(w.w), (fn_a or keep)(w.a), (fn_b or keep)(w.b), w.scale)

