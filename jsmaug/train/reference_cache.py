"""`reference.mode=precomputed`: the frozen reference's log-probs of every pair, computed once and cached.

Every process computes the rows its devices hold (`sharding.put_pairs`); the per-pair results come back
replicated, so every process has the whole table and process 0 writes it once, to
`workdir/ref_cache/ref_logps-<fingerprint>.npy`. The fingerprint covers the tokenised pairs, the reference
weights (`tree_digest`, which does not depend on the mesh or the process count), the tokenizer, the
truncation settings and LD-DPO's `ld_alpha` (it weighs the log-probs), so a run on another mesh or another number of hosts reuses the file.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jsmaug.train import step as step_lib
from jsmaug.train.metrics_log import log


def tree_digest(tree) -> str:
    """A hash of every array's bits, computed where the arrays live: per leaf, two position-weighted sums of
    its bit patterns in uint32 arithmetic. Integer sums are exact in any order, so the digest is the same
    whatever the sharding, mesh or process count, and no weight travels to the host."""
    leaves = jax.tree.leaves(tree)
    mesh = next((x.sharding.mesh for x in leaves if isinstance(getattr(x, "sharding", None), NamedSharding)), None)

    def sums(x):
        bits = jax.lax.bitcast_convert_type(x, jnp.uint16 if x.dtype.itemsize == 2 else jnp.uint32)
        bits = bits.astype(jnp.uint32)
        out = []
        for mult in (jnp.uint32(2654435761), jnp.uint32(40503)):
            w = jnp.uint32(1)
            for d in range(x.ndim):
                w = w + jax.lax.broadcasted_iota(jnp.uint32, x.shape, d) * (mult + jnp.uint32(2 * d + 1))
            out.append(jnp.sum(bits * w, dtype=jnp.uint32))
        return jnp.stack(out)

    out_sh = NamedSharding(mesh, P()) if mesh is not None else None
    digests = jax.device_get(jax.jit(lambda t: [sums(x) for x in t], out_shardings=out_sh)(leaves))
    h = hashlib.sha256()
    for leaf, d in zip(leaves, digests):
        h.update(f"{leaf.shape}{leaf.dtype}".encode() + np.asarray(d).tobytes())
    return h.hexdigest()[:16]


def examples_fingerprint(examples) -> str:
    h = hashlib.sha256()
    for ex in examples:
        for k in ("prompt", "chosen", "rejected"):
            h.update(ex[k].tobytes() + b"|")
    return h.hexdigest()[:16]


def fixed_chunks(examples, batch_size):
    """Every example once, in order, in full batches of pairs (the last one padded by repeating its first pair);
    yields (number of real pairs, pairs)."""
    for i in range(0, len(examples), batch_size):
        chunk = list(examples[i:i + batch_size])
        n = len(chunk)
        yield n, chunk + [chunk[0]] * (batch_size - n)


def precompute(cfg, mconf, ref_params, examples: Sequence[dict], place: Callable, outputs, tok_fp: str
               ) -> np.ndarray:
    """Reference logps (chosen, rejected) of every example, an (N, 2) float32 array, from the cache when it
    holds them. `place(pairs)` puts a global batch of pairs on the mesh (each process collates its rows)."""
    fp = hashlib.sha256(json.dumps([examples_fingerprint(examples), tree_digest(ref_params), tok_fp,
                                    cfg.data.max_length, cfg.data.max_prompt_length,
                                    cfg.reference.dtype, cfg.loss.ld_alpha]).encode()).hexdigest()[:20]
    path = outputs.ref_cache_path(fp)
    if path.exists():
        log(f"reference logps: cached {path}")
        return np.load(io.BytesIO(path.read_bytes()))
    jitted = fn = None
    out = np.zeros((len(examples), 2), np.float32)
    t0 = time.time()
    bs = cfg.train.batch_size
    for i, (n, chunk) in enumerate(fixed_chunks(examples, bs)):
        batch = place(chunk)
        if fn is None:  # on a mesh, traced where the MoE layers can see it (token dispatch); results replicated
            sharding = batch["input_ids"].sharding
            jitted = jax.jit(functools.partial(step_lib.reference_logps, mconf, chunk_size=cfg.train.logps_chunk_size,
                                               ld_alpha=cfg.loss.ld_alpha), out_shardings=NamedSharding(sharding.mesh, P()))
            fn = step_lib.on_mesh(jitted, jax.tree.map(lambda x: x.sharding, batch))
        lp = np.asarray(jax.device_get(fn(ref_params, batch)))
        out[i * bs:i * bs + n, 0] = lp[:n]
        out[i * bs:i * bs + n, 1] = lp[bs:bs + n]
    outputs.save_ref_cache(path, out)
    log(f"reference logps: computed for {len(examples)} pairs in {time.time() - t0:.1f}s -> {path}")
    return out
