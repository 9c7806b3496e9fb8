"""Attention's forward and backward on CPU, by row layout and block: `xla` and `chunked` with blocks of 512, 256,
128 and 64 tokens, on one long sequence per row and on packed rows of shorter ones, alternating (the measurement
behind `attention.CPU_CHUNK_BLOCK`; docs/performance.md, "Attention blocks on CPU"). Before timing, every
contender's gradients are checked against `xla`'s (or the largest block's where `xla` is left out). About 6 minutes
on the 2-core CPU machine.

    python -m jsmaug.perf.attention_blocks [--quick] [--json_out docs/bench_cpu_DATE_attention_blocks.jsonl]
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

from jsmaug import paths
from jsmaug.models import attention
from jsmaug.perf import bench

BLOCKS = (512, 256, 128, 64)
# (row length, sequence length): one sequence per row, or packed rows of shorter ones
LAYOUTS = ((256, 256), (512, 512), (512, 128), (1024, 1024), (1024, 256), (2048, 2048), (2048, 384), (4096, 4096),
           (4096, 512))
HEADS = ((4, 2, 64), (8, 2, 128))  # (query heads, kv heads, head dim): the step model's, and a wider one
XLA_UP_TO = 2048  # xla's (S, S) scores per head beyond this take seconds and gigabytes


def grads_fn(impl: str, segment_ids, block: int = 512):
    """d/d(q, k, v) of sum(attention(q, k, v)^2), jitted, for one path and block."""
    def loss(q, k, v):
        if impl == "chunked":  # the block as given, not the CPU cap (the point is to compare blocks)
            out = attention.chunked_attention(q, k, v, segment_ids, block_size=block)
        else:
            out = attention.self_attention(q, k, v, segment_ids, implementation=impl, block_size=block)
        return jnp.sum(out ** 2)
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def measure(row: int, seq: int, heads: int, kv_heads: int, head_dim: int, rounds: int = 3, calls: int = 4) -> dict:
    """Milliseconds per fwd+bwd call of each contender on one row of `row` tokens holding sequences of `seq`."""
    ids = sum(([i + 1] * seq for i in range(row // seq)), [])
    segment_ids = jnp.array([ids + [0] * (row - len(ids))], jnp.int32)
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(1, row, h, head_dim)).astype(np.float32))
               for h in (heads, kv_heads, kv_heads))
    fns = {f"chunked{b}": grads_fn("chunked", segment_ids, b) for b in BLOCKS}
    if row <= XLA_UP_TO:
        fns["xla"] = grads_fn("xla", segment_ids)
    want = jax.device_get(fns["xla" if "xla" in fns else f"chunked{BLOCKS[0]}"](q, k, v))
    for name, fn in fns.items():  # one program, several layouts: the same gradients (this also compiles each)
        for got, w in zip(jax.device_get(fn(q, k, v)), want):
            np.testing.assert_allclose(got, w, rtol=2e-3, atol=2e-3 * float(np.abs(w).max()), err_msg=name)
    runs = {name: (lambda fn=fn: jax.block_until_ready(fn(q, k, v))) for name, fn in fns.items()}
    ms = {k: round(t * 1e3, 2) for k, t in bench.time_alternating(runs, rounds, block=calls).items()}
    best = min(ms, key=ms.get)
    return {"row": row, "sequence": seq, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim, "ms": ms,
            "fastest": best, "cpu_block_vs_512": round(ms["chunked512"] / ms[f"chunked{attention.CPU_CHUNK_BLOCK}"], 3),
            "machine": bench.machine()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json_out", default=None, help="one JSON line per layout and head shape")
    ap.add_argument("--quick", action="store_true", help="two small layouts, one round (a smoke run)")
    args = ap.parse_args(argv)
    layouts, heads = (((256, 256), (512, 128)), HEADS[:1]) if args.quick else (LAYOUTS, HEADS)
    lines = []
    for h, kv, dh in heads:
        for row, seq in layouts:
            r = measure(row, seq, h, kv, dh, rounds=1 if args.quick else 3)
            print(json.dumps(r), flush=True)
            lines.append(json.dumps(r))
    if args.json_out:
        paths.atomic_write(args.json_out, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
