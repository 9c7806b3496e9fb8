"""Expert parallelism that moves tokens, not weights: `shard_map` + `all_to_all` MoE dispatch.

`model.moe_dispatch`:
- "gspmd":      the expert weights stay split over the `expert` mesh axis and XLA's sharding propagation
                inserts whatever collectives the dispatch needs (in practice it gathers each layer's experts).
- "all_to_all": inside `shard_map`, each shard routes its own tokens, sorts its (token, expert) assignments by
                the shard that holds the expert, exchanges them with `jax.lax.all_to_all` over `expert` in a
                fixed-size buffer that holds the worst case (every assignment to one shard: dropless whatever the
                router does), runs its local experts with the backend's dropless path (`model.moe_impl`), sends
                the results back and combines them with the routing weights. Weights split over `fsdp` are
                gathered inside (ZeRO-3 style); weights split over `tensor` (the mlp axis) give partial sums that
                are added over `tensor`.
- "auto":       `all_to_all` where the mesh has an expert axis > 1, or where the experts run the megablox kernels
                (TPU) on more than one device; else `gspmd` (one device, or no expert axis off TPU). See
                `resolve_dispatch` and docs/pods.md "How tokens reach their experts".

The mesh is not part of the model: the trainer traces its steps inside `mesh_context.mesh_scope(mesh, batch_axes)`,
and the MoE layer reads it (jsmaug/parallel/mesh_context.py). Outside that context (one device, tests of the model alone)
every dispatch is local.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jsmaug.models import factored, moe
from jsmaug.models.glu import SWIGLU

from jsmaug.parallel import mesh_context

DISPATCHES = ("auto", "gspmd", "all_to_all")


def resolve_dispatch(dispatch: str, mesh=None, impl: str = "auto") -> str:
    """`auto` -> all_to_all on a mesh of more than one device whose expert axis is > 1, or whose experts run
    the megablox kernels (`impl` resolved for the mesh's platform: TPU), which need shard_map; else gspmd.
    `mesh` defaults to the one `mesh_context.mesh_scope` set.

    Chosen from tools/plan_pod.py (v5p-128, 8x7B, 64 x 1024): fsdp 8 x expert 8, gspmd 51.35 GiB per chip and
    19x the analytic matmul FLOPs, all_to_all 24.03 GiB and 0.99x; fsdp 64 (no expert axis), gspmd with ragged
    48.21 GiB and 2.53x, all_to_all (no exchange: one expert shard) with megablox 22.90 GiB and 0.99x."""
    mesh = mesh_context.mesh_or_active(mesh)
    if dispatch != "auto":
        return dispatch
    if mesh is None or mesh.size == 1:
        return "gspmd"  # nothing to move
    if mesh.shape.get("expert", 1) > 1:
        return "all_to_all"
    return "all_to_all" if moe.resolve_impl(impl, mesh_context.target_platform(mesh)) == "megablox" else "gspmd"


def resolve_local_impl(impl: str, dispatch: str, mesh=None) -> str:
    """The experts' path (`moe.resolve_impl`), except that a Pallas kernel cannot sit in a GSPMD-partitioned
    program: `megablox` under the `gspmd` dispatch on a mesh of more than one device becomes `ragged`, which XLA
    partitions (inside all_to_all's shard_map, or on one device, megablox stays)."""
    mesh = mesh_context.mesh_or_active(mesh)
    local = moe.resolve_impl(impl, mesh_context.target_platform(mesh))
    multi_device = mesh is not None and mesh.size > 1
    if local == "megablox" and multi_device and resolve_dispatch(dispatch, mesh, impl) == "gspmd":
        return "ragged"
    return local


def expert_ffn(x_TxD, idx_TxK, w_TxK, w1_ExDxF, w3_ExDxF, w2_ExFxD, *, dispatch: str = "auto", b13=None,
               **local_kw):
    """The MoE feed-forward with the configured token dispatch. Returns (y_TxD, dropped assignments). `b13`: None
    or the experts' (E, F) gate/up biases (gpt-oss); `local_kw` (impl, glu, ...) go to `moe.expert_ffn`."""
    ctx = mesh_context.active_mesh()
    impl = local_kw.get("impl", "auto")
    dispatch = resolve_dispatch(dispatch, impl=impl)
    local_kw = dict(local_kw, impl=resolve_local_impl(impl, dispatch))
    if ctx is None or dispatch == "gspmd":
        return moe.expert_ffn(x_TxD, idx_TxK, w_TxK, w1_ExDxF, w3_ExDxF, w2_ExFxD, b13=b13, **local_kw)
    mesh, batch_axes = ctx
    d, f = w1_ExDxF.shape[1], w1_ExDxF.shape[2]
    fsdp = "fsdp" if mesh.shape["fsdp"] > 1 and d % mesh.shape["fsdp"] == 0 else None
    tensor = "tensor" if mesh.shape["tensor"] > 1 and f % mesh.shape["tensor"] == 0 else None
    tokens = P(batch_axes or None, None)
    if x_TxD.shape[0] % max(math.prod(mesh.shape[a] for a in batch_axes), 1):
        raise ValueError(f"all_to_all dispatch: {x_TxD.shape[0]} tokens do not split over {batch_axes}")
    body = functools.partial(_shard_body, ep=mesh.shape["expert"], fsdp=fsdp, tensor=tensor,
                             all_axes=tuple(mesh.axis_names), local_kw=local_kw)
    up, down = ("expert", fsdp, tensor), ("expert", tensor, fsdp)
    fn = jax.shard_map(body, mesh=mesh, check_vma=False,
                       in_specs=(tokens, tokens, tokens, _spec(w1_ExDxF, up), _spec(w3_ExDxF, up),
                                 _spec(w2_ExFxD, down), None if b13 is None else (P("expert", tensor),) * 2),
                       out_specs=(tokens, P()))
    return fn(x_TxD, idx_TxK, w_TxK, w1_ExDxF, w3_ExDxF, w2_ExFxD, b13)


def _spec(w, axes):
    """The shard_map spec of an expert weight with mesh axes (expert, in, out); a Factored weight's A is split like
    W's (expert, in) axes and B like its (expert, out) axes (their rank axis is never split)."""
    e, i, o = axes
    if factored.is_factored(w):
        return factored.Factored(P(e, i, o), P(e, i, None), P(e, None, o), w.scale)
    return P(e, i, o)


def _shard_body(x_TxD, idx_TxK, w_TxK, w1, w3, w2, b13, *, ep, fsdp, tensor, all_axes, local_kw):
    """One shard: T local tokens, E_l local experts (of E), `ep` shards on the expert axis. With one expert shard
    (megablox under fsdp alone) the tokens stay where they are: the exchange's buffers, each of the assignments'
    size, would only copy them (about 1 GiB a layer at 8x7B's 2 x 4096 tokens a chip, docs/planning.md)."""
    if fsdp:  # ZeRO-3: this layer's (local) experts in full for the matmuls (LoRA: A holds W's in axis, B its out)
        gather = lambda axis: lambda v: jax.lax.all_gather(v, fsdp, axis=axis, tiled=True)  # noqa: E731
        w1, w3 = (factored.map_parts(w, gather(1), gather(1)) for w in (w1, w3))
        w2 = factored.map_parts(w2, gather(2), None, gather(2))
    if local_kw.get("token_chunks", 1) > 1 and ep > 1:
        raise ValueError("model.moe_token_chunks > 1 runs on one expert shard (gspmd, or all_to_all with "
                         f"mesh.expert=1); this mesh has {ep} expert shards: set model.moe_token_chunks=1")
    if ep == 1:  # every expert is local: no exchange, the local path on this shard's own tokens
        y_TxD, dropped = moe.expert_ffn(x_TxD, idx_TxK, w_TxK, w1, w3, w2, b13=b13, **local_kw)
        if tensor:
            y_TxD = jax.lax.psum(y_TxD, tensor)
        return y_TxD, jax.lax.psum(dropped, tuple(a for a in all_axes if a != tensor))
    num_local = w1.shape[0]
    t, k = idx_TxK.shape
    a = t * k  # assignments of this shard; the worst case sends all of them to one shard
    expert_A = idx_TxK.reshape(-1)
    dest_A = expert_A // num_local
    order_A = jnp.argsort(dest_A, stable=True)
    dest_sorted = dest_A[order_A]
    counts = jnp.bincount(dest_A, length=ep)
    rank_A = jnp.arange(a) - (jnp.cumsum(counts) - counts)[dest_sorted]
    token_A = order_A // k
    send_x = jnp.zeros((ep, a, x_TxD.shape[1]), x_TxD.dtype).at[dest_sorted, rank_A].set(x_TxD[token_A])
    # Local expert of each row; empty slots get `num_local` (no expert), see _local_experts.
    send_e = jnp.full((ep, a), num_local, jnp.int32).at[dest_sorted, rank_A].set(expert_A[order_A] % num_local)
    recv_x = jax.lax.all_to_all(send_x, "expert", 0, 0)  # recv[src] = what shard `src` sent to this one
    recv_e = jax.lax.all_to_all(send_e, "expert", 0, 0)
    y_RxD, dropped = _local_experts(recv_x.reshape(ep * a, -1), recv_e.reshape(-1), w1, w3, w2, b13, local_kw, a)
    if tensor:  # the mlp axis was split: each shard holds a partial sum of w2's output
        y_RxD = jax.lax.psum(y_RxD, tensor)
    back = jax.lax.all_to_all(y_RxD.reshape(ep, a, -1), "expert", 0, 0)  # back[dest] = results from `dest`
    y_AxD = back[dest_sorted, rank_A]
    weight_A = w_TxK.reshape(-1)[order_A].astype(y_AxD.dtype)
    out = jnp.zeros_like(x_TxD).at[token_A].add(y_AxD * weight_A[:, None])
    # Tensor shards hold the same rows (each computes part of the mlp axis): count their drops once.
    return out, jax.lax.psum(dropped, tuple(a for a in all_axes if a != tensor))


def _local_experts(x_RxD, expert_R, w1, w3, w2, b13, local_kw, rows_per_source):
    """The received rows through this shard's experts; rows with expert id `num_local` are empty slots.

    `ragged` and `megablox` sort the empty slots last and leave them out of the groups (megablox: no work);
    `bucketed` gives them no buffer rows and sizes its capacities for the real load, so its work follows the
    busiest local expert's real rows, not the buffer. `dense`, `blocked` and `capacity` need an expert per row:
    empty slots are spread over the local experts with combine weight 0, so they add work (the price of a
    fixed-size buffer) but never change a result; the count of dropped assignments (`capacity` only) then
    includes empty slots."""
    num_local = w1.shape[0]
    valid_R = expert_R < num_local
    impl = moe.resolve_impl(local_kw.get("impl", "auto"))
    glu = local_kw.get("glu", SWIGLU)
    if impl in ("ragged", "megablox"):
        order = jnp.argsort(expert_R, stable=True)
        sizes = jnp.bincount(expert_R, length=num_local).astype(jnp.int32)  # empty slots (id num_local) dropped
        y = moe.grouped_glu(x_RxD[order], w1, w3, w2, sizes, impl, glu=glu, b13=b13)  # empty slots sort last: 0
        return jnp.zeros_like(x_RxD).at[order].set(y), jnp.zeros((), jnp.int32)
    weight_Rx1 = valid_R[:, None].astype(jnp.float32)
    if impl == "bucketed":  # empty slots take no buffer rows; capacities sized for the expected real load
        ep = x_RxD.shape[0] // rows_per_source
        return moe.bucketed_ffn(x_RxD, jnp.minimum(expert_R, num_local - 1)[:, None], weight_Rx1, w1, w3, w2,
                                valid_TxK=valid_R[:, None], mean_load=x_RxD.shape[0] / (ep * num_local), glu=glu,
                                b13=b13)
    spread = jnp.where(valid_R, expert_R, jnp.arange(expert_R.shape[0]) % num_local)
    return moe.expert_ffn(x_RxD, spread[:, None], weight_Rx1, w1, w3, w2, b13=b13, **local_kw)
