"""Many small experts on CPU: Qwen3-30B-A3B's MoE layer in miniature (hidden 512, 64 experts of width 192, top-8,
2,048 tokens; the real one is 128 experts of 768 at hidden 2048), forward and backward.

    python -m jsmaug.perf.moe_bench [--quick] [--ladder]     # tools/bench.py records `bench_many_small_experts`

- `bench_many_small_experts`: the dropless paths (bucketed, the CPU default; blocked) in useful GFLOP/s against
  one dense matmul of the same useful FLOPs (the T*k rows through one expert's SwiGLU), timed side by side
  with `jsmaug.perf.bench.time_alternating` and recorded with `jsmaug.perf.bench.record`.
- `measure_ladder`: what bucketed's capacity branches cost at this shape: the expert part (`_grouped_swiglu`,
  fwd+bwd) compiled for one capacity C at a time, C from the mean load to all tokens, against the busiest
  expert's load under a random router and under skewed ones; and the whole layer with the current ladder
  against a ladder of one exact branch (what a perfect ladder could save). This decides the ladder's factors.
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

from jsmaug.models import moe
from jsmaug.perf.bench import record, time_alternating

QWEN3_30B_MINI = dict(tokens=2048, d=512, f=192, e=64, k=8)
QUICK = dict(tokens=256, d=64, f=32, e=64, k=8)  # a smoke run (tools/bench.py --quick)


def _inputs(tokens, d, f, e, skew=0.0, seed=0):
    ks = jax.random.split(jax.random.key(seed), 5)
    x = jax.random.normal(ks[0], (tokens, d))
    # skew > 0: expert j's logit shifted by -skew * j / e, a smooth imbalance (expert 0 the busiest)
    logits = jax.random.normal(ks[1], (tokens, e)) - skew * jnp.arange(e) / e
    w = tuple(jax.random.normal(kk, shape) * 0.05 for kk, shape in zip(ks[2:], ((e, d, f), (e, d, f), (e, f, d))))
    return x, logits, w


def useful_flops(tokens, d, f, k) -> float:
    """fwd+bwd = 3x the forward; 3 matmuls of 2*d*f per (token, expert) assignment."""
    return 3.0 * tokens * k * 3 * 2 * d * f


def _layer(impl, k, block=128, **bucketed_kw):
    """jit(grad) of the layer in (x, w1, w3, w2); the router logits are an argument (not a folded constant)."""
    def loss(x, w1, w3, w2, logits):
        _, idx, w = moe.route(logits, k)
        if bucketed_kw:
            y, _ = moe.bucketed_ffn(x, idx, w, w1, w3, w2, **bucketed_kw)
        else:
            y, _ = moe.expert_ffn(x, idx, w, w1, w3, w2, impl=impl, block_size=block)
        return jnp.sum(y * y)
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))


def _dense_equiv(k):
    def loss(x, w1, w3, w2, logits):
        del logits
        xs = jnp.tile(x, (k, 1))  # T*k rows through one expert: the same useful FLOPs in plain matmuls
        return jnp.sum(moe._swiglu(xs, w1[0], w3[0], w2[0], x.dtype) ** 2)
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))


def _calls(fns, *args):
    calls = {name: (lambda fn=fn: jax.block_until_ready(fn(*args))) for name, fn in fns.items()}
    for call in calls.values():
        call()  # compile + warm-up
    return calls


def bench_many_small_experts(tokens=2048, d=512, f=192, e=64, k=8, rounds=5, impls=("bucketed", "blocked"),
                             block=128) -> dict[str, float]:
    """Records `moe/many_small_experts_<impl>_vs_dense_matmul` (useful GFLOP/s); returns the rates."""
    x, logits, w = _inputs(tokens, d, f, e)
    fns = {"dense_matmul": _dense_equiv(k)}
    fns.update({impl: _layer(impl, k, block) for impl in impls})
    times = time_alternating(_calls(fns, x, *w, logits), rounds)
    useful = useful_flops(tokens, d, f, k)
    rates = {name: useful / t / 1e9 for name, t in times.items()}
    cfg = f"T={tokens} D={d} F={f} E={e} top-{k} f32 fwd+bwd (Qwen3-30B-A3B's MoE layer in miniature)"
    for impl in impls:
        label = "jsmaug bucketed dropless (the CPU default)" if impl == "bucketed" else f"jsmaug {impl} dropless"
        if impl == "blocked":
            label += f" block={block}"
        record(f"moe/many_small_experts_{impl}_vs_dense_matmul", rates[impl], rates["dense_matmul"],
               "useful GFLOP/s", cfg, label, "one dense matmul, same useful FLOPs")
    return rates


def _branch_cost(capacity, tokens, d, f, e, k, rounds):
    """Seconds of bucketed's expert part (fwd+bwd of `_grouped_swiglu`) compiled for one capacity."""
    x, logits, w = _inputs(tokens, d, f, e)
    _, idx, _ = moe.route(logits, k)
    _, token_A, expert_A, _, slot_A = moe._sort_assignments(idx, e)
    g = jax.random.normal(jax.random.key(9), (tokens * k, d))

    @jax.jit
    def fn(x, w1, w3, w2, token_A, expert_A, slot_A, g):
        f_ = lambda *a: moe._grouped_swiglu((capacity,), *a, token_A, expert_A, slot_A, jnp.int32(0))
        y, vjp = jax.vjp(f_, x, w1, w3, w2)
        return y, vjp(g)
    return time_alternating(_calls({"c": fn}, x, *w, token_A, expert_A, slot_A, g), rounds)["c"]


def max_load_over_mean(tokens, e, k, skew, seeds=4) -> float:
    """The busiest expert's rows over the mean load, averaged over `seeds` random routers."""
    out = []
    for s in range(seeds):
        _, logits, _ = _inputs(tokens, 8, 8, e, skew, seed=s)
        sizes = np.bincount(np.asarray(moe.route(logits, k)[1]).ravel(), minlength=e)
        out.append(sizes.max() / (tokens * k / e))
    return float(np.mean(out))


def measure_ladder(tokens=2048, d=512, f=192, e=64, k=8, rounds=3,
                   factors=(1.0, 1.0625, 1.125, 1.25, 1.5, 2.0, 3.0)) -> dict:
    """Prints and returns the measurements that choose bucketed's ladder at this shape (see the module doc)."""
    mean = tokens * k / e
    useful = useful_flops(tokens, d, f, k)
    caps = sorted({min(tokens, -(-int(np.ceil(fa * mean)) // 8) * 8) for fa in factors} | {tokens})
    branch = {}
    for c in caps:
        branch[c] = _branch_cost(c, tokens, d, f, e, k, rounds)
        print(f"  capacity {c:5d} ({c / mean:5.3f} x mean): {branch[c] * 1e3:8.1f} ms, "
              f"{useful / branch[c] / 1e9:6.1f} useful GFLOP/s", flush=True)
    loads = {skew: max_load_over_mean(tokens, e, k, skew) for skew in (0.0, 0.5, 1.0, 2.0)}
    ladder = moe.bucket_capacities(tokens, k, e)
    for skew, m in loads.items():
        c = ladder[int(np.searchsorted(ladder, m * mean))]
        print(f"  router skew {skew}: busiest expert {m:.3f} x the mean load -> branch {c} ({c / mean:.3f} x)",
              flush=True)
    # The whole layer: the current ladder against one branch of exactly the busiest expert's load.
    x, logits, w = _inputs(tokens, d, f, e)
    sizes = np.bincount(np.asarray(moe.route(logits, k)[1]).ravel(), minlength=e)
    exact = -(-int(sizes.max()) // 8) * 8
    fns = {"ladder": _layer("bucketed", k), "exact": _layer("bucketed", k, factors=(exact / mean,))}
    whole = time_alternating(_calls(fns, x, *w, logits), rounds)
    print(f"  whole layer: current ladder {whole['ladder'] * 1e3:.1f} ms, one exact branch (C={exact}) "
          f"{whole['exact'] * 1e3:.1f} ms; caps {moe.bucket_capacities(tokens, k, e)}", flush=True)
    return {"branch_seconds": branch, "max_load_over_mean": loads, "whole": whole, "exact_capacity": exact}


def compare_ladders(skew, ladders: dict[str, tuple[float, ...]], tokens=2048, d=512, f=192, e=64, k=8,
                    rounds=3) -> dict[str, float]:
    """Seconds of the whole layer (fwd+bwd) under a router of `skew` with each ladder of capacity factors."""
    x, logits, w = _inputs(tokens, d, f, e, skew)
    sizes = np.bincount(np.asarray(moe.route(logits, k)[1]).ravel(), minlength=e)
    fns = {name: _layer("bucketed", k, factors=fac) for name, fac in ladders.items()}
    out = time_alternating(_calls(fns, x, *w, logits), rounds)
    print(f"  router skew {skew} (busiest expert {sizes.max() / (tokens * k / e):.2f} x the mean): "
          + ", ".join(f"{n} {moe.bucket_capacities(tokens, k, e, ladders[n])} {t * 1e3:.0f} ms"
                      for n, t in out.items()), flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny shapes (a smoke run)")
    ap.add_argument("--ladder", action="store_true", help="also measure bucketed's capacity branches")
    args = ap.parse_args(argv)
    shape = QUICK if args.quick else QWEN3_30B_MINI
    bench_many_small_experts(**shape, rounds=2 if args.quick else 5)
    if args.ladder:
        measure_ladder(**shape, rounds=2 if args.quick else 3)
    return 0


if __name__ == "__main__":
    sys.exit(main())
