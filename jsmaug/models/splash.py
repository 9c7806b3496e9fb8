"""Splash attention: the Pallas TPU kernel (jax.experimental.pallas.ops.tpu.splash_attention) behind
`model.attention_impl=splash`, with the same meaning as jsmaug/models/attention.py's other paths.

- The kernel works on one example, (heads, length, head_dim); it is vmapped over the batch.
- Causal, or causal + sliding window (`LocalMask((S, S), (window - 1, 0))`: HF's q - k < window), as a static
  block-sparse mask: key blocks that the mask rules out are skipped. Packing and padding are segment ids
  (padding is segment 0: a real query never sees it; padding queries see only padding and are never used).
- GQA is native (the kernel maps query head h to kv head h // G); MQA is GQA with one kv head.
- Lengths are padded to a multiple of the block (a multiple of 128, the TPU lane width) and head_dim to a
  multiple of 128 (zero columns: the dot products are unchanged and the extra output columns are cut off).
- On a mesh (the trainer's `mesh_context.mesh_scope`), the kernel runs under `shard_map`: batch rows over
  the batch axes, heads over `tensor` (the kernel is a custom call that XLA's sharding propagation cannot split).
- Attention sinks (gpt-oss, one logit per query head) go to the kernel's own `sinks` argument, which starts each
  row's online softmax from the sink and returns its gradient; under shard_map they split over heads like q.
- Off TPU the kernel runs in Pallas interpret mode: exact, slow, for tests on CPU only.
"""

from __future__ import annotations

import concurrent.futures
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jsmaug.parallel import mesh_context

LANES = 128


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _splash_modules():
    """Imported on first use, so that a JAX without the TPU Pallas ops still runs every other path."""
    try:
        from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
        from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
    except ImportError as err:
        raise RuntimeError(f"model.attention_impl=splash: this JAX ({jax.__version__}) has no "
                           f"jax.experimental.pallas.ops.tpu.splash_attention ({err}); use chunked") from err
    return sk, sm


@functools.lru_cache(maxsize=64)
def _kernel(heads: int, length: int, window: int | None, block: int, interpret: bool):
    """The kernel object for one (padded) shape; built once per shape (its block-sparsity tables are numpy)."""
    sk, sm = _splash_modules()
    if window is None:
        head_mask = sm.CausalMask((length, length))
    else:
        head_mask = sm.LocalMask((length, length), window_size=(window - 1, 0), offset=0)
    sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                          block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)

    def build():
        kernel = sk.make_splash_mha(sm.MultiHeadMask([head_mask] * heads), head_shards=1, q_seq_shards=1,
                                    block_sizes=sizes, interpret=interpret)
        return jax.tree.map(np.asarray, kernel)

    # The kernel's block tables must be constants embedded in the program: built in a fresh thread (JAX's trace
    # state is per thread, so no tracer of the jit or shard_map that asked first can leak into them) and kept as
    # numpy (a device array would become a hidden argument of the jitted step).
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(build).result()


def _local(q_BxSxHxDh, k_BxSxKxDh, v_BxSxKxDh, seg_BxS, sinks_H=None, *, window, block_size, interpret):
    """Splash over a batch on one device (or one shard): pads, transposes to heads-major and vmaps the kernel."""
    b, s, h, dh = q_BxSxHxDh.shape
    block = min(_round_up(block_size, LANES), _round_up(s, LANES))
    s_pad, dh_pad = _round_up(s, block) - s, _round_up(dh, LANES) - dh

    def prep(x, scale=1.0):  # (B, S, N, Dh) -> (B, N, S + pad, Dh + pad)
        x = jnp.pad(x * jnp.asarray(scale, x.dtype), [(0, 0), (0, s_pad), (0, 0), (0, dh_pad)])
        return x.transpose(0, 2, 1, 3)

    seg = jnp.pad(jnp.asarray(seg_BxS, jnp.int32), [(0, 0), (0, s_pad)])
    kernel = _kernel(h, s + s_pad, window, block, interpret)

    segment_ids = _splash_modules()[0].SegmentIds

    def one(q, k, v, ids, sinks):
        return kernel(q, k, v, segment_ids=segment_ids(q=ids, kv=ids), sinks=sinks)

    sinks = None if sinks_H is None else sinks_H.astype(jnp.float32)  # logits of the scaled scores' kind
    out = jax.vmap(one, in_axes=(0, 0, 0, 0, None))(prep(q_BxSxHxDh, dh ** -0.5), prep(k_BxSxKxDh),
                                                    prep(v_BxSxKxDh), seg, sinks)
    return out.transpose(0, 2, 1, 3)[:, :s, :, :dh].astype(q_BxSxHxDh.dtype)


def splash_attention(q_BxSxHxDh, k_BxSxKxDh, v_BxSxKxDh, segment_ids_BxS, sliding_window: int | None = None,
                     block_size: int = 512, interpret: bool | None = None, sinks_H=None):
    """Causal self-attention with the splash kernel (see the module docstring); `sinks_H`: attention sinks."""
    ctx = mesh_context.active_mesh()
    if interpret is None:
        interpret = mesh_context.target_platform() != "tpu"
    local = functools.partial(_local, window=sliding_window, block_size=block_size, interpret=interpret)
    if ctx is None:
        return local(q_BxSxHxDh, k_BxSxKxDh, v_BxSxKxDh, segment_ids_BxS, sinks_H)
    mesh, batch_axes = ctx
    b, h, kv = q_BxSxHxDh.shape[0], q_BxSxHxDh.shape[2], k_BxSxKxDh.shape[2]
    rows = tuple(batch_axes)
    while rows and b % math.prod(mesh.shape[a] for a in rows):
        rows = rows[:-1]  # as sharding.spec_for: drop trailing axes until the product divides the batch
    tp = mesh.shape["tensor"]
    heads = "tensor" if tp > 1 and h % tp == 0 else None
    if heads and kv % tp:  # kv heads do not split over tensor: give every query head its own copy
        k_BxSxKxDh = jnp.repeat(k_BxSxKxDh, h // kv, axis=2)
        v_BxSxKxDh = jnp.repeat(v_BxSxKxDh, h // kv, axis=2)
    act = P(rows or None, None, heads, None)
    if sinks_H is None:
        fn = jax.shard_map(local, mesh=mesh, in_specs=(act, act, act, P(rows or None, None)), out_specs=act,
                           check_vma=False)
        return fn(q_BxSxHxDh, k_BxSxKxDh, v_BxSxKxDh, segment_ids_BxS)
    fn = jax.shard_map(local, mesh=mesh, in_specs=(act, act, act, P(rows or None, None), P(heads)), out_specs=act,
                       check_vma=False)
    return fn(q_BxSxHxDh, k_BxSxKxDh, v_BxSxKxDh, segment_ids_BxS, sinks_H)
