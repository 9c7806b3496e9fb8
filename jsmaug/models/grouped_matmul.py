"""Grouped matmul, the core of the sorted MoE paths: rows sorted by group, each group times its own matrix.

    grouped_matmul(lhs_MxK, rhs_GxKxN, group_sizes_G, impl) -> (M, N)

Rows [0, sizes[0]) use rhs[0], the next sizes[1] rows rhs[1], and so on; rows past sum(sizes) are zero (the
all_to_all dispatch's empty buffer slots live there). Two implementations:

- "ragged":   `jax.lax.ragged_dot`. On TPU XLA runs the forward and the input gradient as a Mosaic grouped-matmul
              kernel, but lowers the weight gradient (contracting over the ragged rows) to one masked *dense*
              product per group over all M rows: `tools/plan_pod.py --save_hlo` shows it (a convolution of
              E x M rows per layer on v5p-128). On GPU and CPU all three are dense fallbacks.
- "megablox": the Pallas TPU kernels `gmm` / `tgmm` (jax.experimental.pallas.ops.tpu.megablox) with their custom
              VJP. The kernel grid is the number of row tiles the group sizes cover, counted at run time, so
              the work follows the rows that are really there, in all three matmuls; empty trailing rows cost
              nothing. Off TPU the kernels run in Pallas interpret mode (exact, slow: tests on CPU).

Rows past sum(sizes) are masked to zero on the way in and out, so the megablox kernels' unwritten output rows
never reach a result or a gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jsmaug.models import factored
from jsmaug.parallel import mesh_context

IMPLS = ("ragged", "megablox")


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _megablox_ops():
    try:
        from jax.experimental.pallas.ops.tpu.megablox import ops
    except ImportError as err:
        raise RuntimeError(f"model.moe_impl=megablox: this JAX ({jax.__version__}) has no "
                           f"jax.experimental.pallas.ops.tpu.megablox ({err}); use ragged or bucketed") from err
    return ops


def _tile(d: int, cap: int) -> int:
    return d if d <= cap else cap


def megablox_tiling(m: int, k: int, n: int) -> tuple[int, int, int]:
    """(tm, tk, tn): rows in tiles of up to 512, the other dims up to 1024 (Mixtral's 4096 and 14336 split
    evenly; plan_pod compiles these tiles for v5p and v6e). Untuned: no TPU was available to time others."""
    return _tile(m, 512), _tile(k, 1024), _tile(n, 1024)


def _megablox(lhs_MxK, rhs_GxKxN, group_sizes_G, interpret: bool):
    m = lhs_MxK.shape[0]
    tm = 512 if m >= 512 else _round_up(m, 8)
    pad = _round_up(m, tm) - m  # the kernel wants whole row tiles; the padding rows are in no group
    lhs = jnp.pad(lhs_MxK, [(0, pad), (0, 0)])
    out = _megablox_ops().gmm(lhs, rhs_GxKxN, group_sizes_G, lhs_MxK.dtype, megablox_tiling, None, None, False,
                              interpret)
    return out[:m]


def grouped_matmul(lhs_MxK, rhs_GxKxN, group_sizes_G, impl: str = "ragged", interpret: bool | None = None,
                   all_rows_grouped: bool = False):
    """See the module docstring. `interpret` (megablox): default True off TPU. `all_rows_grouped`: the caller
    knows sum(group_sizes) == M (the one-device MoE path), so the masks of rows past the groups are skipped.
    A `factored.Factored` rhs (LoRA) runs as three grouped matmuls: lhs @ W + s (lhs @ A) @ B."""
    if factored.is_factored(rhs_GxKxN):
        kw = dict(group_sizes_G=group_sizes_G, impl=impl, interpret=interpret, all_rows_grouped=all_rows_grouped)
        mid_MxR = grouped_matmul(lhs_MxK, rhs_GxKxN.a, **kw) * jnp.asarray(rhs_GxKxN.scale, lhs_MxK.dtype)
        return grouped_matmul(lhs_MxK, rhs_GxKxN.w, **kw) + grouped_matmul(mid_MxR, rhs_GxKxN.b, **kw)
    group_sizes_G = group_sizes_G.astype(jnp.int32)
    rhs = rhs_GxKxN.astype(lhs_MxK.dtype)
    rows = None if all_rows_grouped else (jnp.arange(lhs_MxK.shape[0]) < jnp.sum(group_sizes_G))[:, None]
    lhs = lhs_MxK if rows is None else jnp.where(rows, lhs_MxK, 0)
    if impl == "ragged":
        out = jax.lax.ragged_dot(lhs, rhs, group_sizes_G)
    elif impl == "megablox":
        if interpret is None:
            interpret = mesh_context.target_platform() != "tpu"
        out = _megablox(lhs, rhs, group_sizes_G, interpret)
    else:
        raise ValueError(f"grouped_matmul: unknown impl {impl!r}; one of {IMPLS}")
    return out if rows is None else jnp.where(rows, out, 0)
