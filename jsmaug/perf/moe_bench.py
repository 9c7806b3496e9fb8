"""Many small experts on CPU: Qwen3-30B-A3B's MoE layer in miniature (hidden 512, 64 experts of width 192, top-8,
2,048 tokens; the real one is 128 experts of 768 at hidden 2048), forward and backward.

    python -m jsmaug.perf.moe_bench [--quick] [--skews] [--overflow]   # tools/bench.py records
                                                                       # `bench_many_small_experts`

- `bench_many_small_experts`: the dropless paths (bucketed, the CPU default; blocked) in useful GFLOP/s against
  one dense matmul of the same useful FLOPs (the T*k rows through one expert's SwiGLU), timed side by side
  with `jsmaug.perf.bench.time_alternating` and recorded with `jsmaug.perf.bench.record`.
- `measure_skews`: the bucketed layer under routers of growing skew: the busiest expert's load, the overflow
  blocks it needs (jsmaug/models/bucketed.py) and the layer's rate against the dense matmul.
- `bench_overflow_modes`: the bucketed layer's overflow blocks as a loop (the CPU default) against the ladder of
  batched branches, at three shapes and three router skews: time (alternating) and compile time of each.
"""

from __future__ import annotations

import argparse
import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np

from jsmaug.models import bucketed, moe
from jsmaug.perf.bench import print_table, record, time_alternating

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


def _layer(impl, k, block=128, ffn=None):
    """jit(grad) of the layer in (x, w1, w3, w2); the router logits are an argument (not a folded constant).
    `ffn(x, idx, w, w1, w3, w2)`, if given, replaces `moe.expert_ffn` with `impl`."""
    ffn = ffn or functools.partial(moe.expert_ffn, impl=impl, block_size=block)

    def loss(x, w1, w3, w2, logits):
        _, idx, w = moe.route(logits, k)
        y, _ = ffn(x, idx, w, w1, w3, w2)
        return jnp.sum(y * y)
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))


def _dense_equiv(k):
    def loss(x, w1, w3, w2, logits):
        del logits
        xs = jnp.tile(x, (k, 1))  # T*k rows through one expert: the same useful FLOPs in plain matmuls
        return jnp.sum(moe.glu_ffn(xs, w1[0], w3[0], w2[0], x.dtype) ** 2)
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


def measure_skews(tokens=2048, d=512, f=192, e=64, k=8, rounds=3, skews=(0.0, 1.0, 2.0, 4.0)) -> dict:
    """The whole bucketed layer (fwd+bwd) under routers of growing skew: the busiest expert's load, the overflow
    blocks the routing needs and the rung that runs them (jsmaug/models/bucketed.py), and the layer's useful
    GFLOP/s against one dense matmul of the same useful FLOPs. Prints and returns {skew: (seconds, dense)}."""
    layout, ladder = bucketed.plan(tokens, k, e)
    useful = useful_flops(tokens, d, f, k)
    out = {}
    for skew in skews:
        x, logits, w = _inputs(tokens, d, f, e, skew)
        sizes = np.bincount(np.asarray(moe.route(logits, k)[1]).ravel(), minlength=e)
        need = int(bucketed.needed_blocks(jnp.asarray(sizes), *layout))
        rung = ladder[int(np.searchsorted(ladder, need))]
        t = time_alternating(_calls({"layer": _layer("bucketed", k), "dense": _dense_equiv(k)}, x, *w, logits),
                             rounds)
        mode = bucketed.overflow_mode()
        print(f"  router skew {skew}: busiest expert {sizes.max() / (tokens * k / e):.2f} x the mean, base capacity "
              f"{layout[0]}, {need} overflow blocks of {layout[1]} rows ({mode}"
              f"{f', rung {rung}' if mode == 'ladder' else ''}): {t['layer'] * 1e3:.1f} ms, "
              f"{useful / t['layer'] / 1e9:.1f} useful GFLOP/s against one dense matmul's "
              f"{useful / t['dense'] / 1e9:.1f}", flush=True)
        out[skew] = (t["layer"], t["dense"])
    return out


OVERFLOW_SHAPES = {  # (tokens, hidden, mlp, experts, top-k)
    "step model": (2048, 256, 512, 8, 2),  # the bench's MoE step model's layer (jsmaug.perf.bench)
    "Qwen3-30B-A3B mini": (2048, 512, 192, 64, 8),
    "tiny config, 7 x 400 packed": (2800, 64, 128, 4, 2),  # configs/tiny_dpo.yaml's layer in issue 44's run
}


def bench_overflow_modes(shapes=OVERFLOW_SHAPES, skews=(0.0, 2.0, 6.0), rounds: int = 7) -> list[dict]:
    """Records `moe/overflow_loop_vs_ladder/<shape>/skew<s>`: the bucketed layer (fwd+bwd) with its overflow
    blocks as a loop against the ladder (seconds, alternating, `rounds` rounds), with each one's compile time."""
    import time

    out = []
    for name, (t, d, f, e, k) in shapes.items():
        layout, _ = bucketed.plan(t, k, e)
        for skew in skews:
            x, logits, w = _inputs(t, d, f, e, skew)
            sizes = np.bincount(np.asarray(moe.route(logits, k)[1]).ravel(), minlength=e)
            need = int(bucketed.needed_blocks(jnp.asarray(sizes), *layout))
            compiled, compile_s = {}, {}
            for m in ("loop", "ladder"):  # the compiled programs are the ones timed: each compiles once
                start = time.perf_counter()
                compiled[m] = _layer("bucketed", k, ffn=functools.partial(moe.bucketed_ffn, overflow=m)).lower(
                    x, *w, logits).compile()
                compile_s[m] = round(time.perf_counter() - start, 2)
            times = time_alternating(_calls(compiled, x, *w, logits), rounds)
            cfg = (f"T={t} D={d} F={f} E={e} top-{k} f32 fwd+bwd, router skew {skew}: busiest expert "
                   f"{sizes.max() / (t * k / e):.2f}x the mean, {need} overflow blocks of {layout[1]} rows; compile "
                   f"loop {compile_s['loop']} s, ladder {compile_s['ladder']} s")
            out.append(record(f"moe/overflow_loop_vs_ladder/{name}/skew{skew:g}", times["loop"], times["ladder"],
                              "s", cfg, "overflow blocks in a loop", "overflow blocks as a ladder of branches"))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny shapes (a smoke run)")
    ap.add_argument("--skews", action="store_true", help="also the bucketed layer under skewed routers")
    ap.add_argument("--overflow", action="store_true", help="only the overflow blocks: loop against ladder")
    ap.add_argument("--json_out", default=None, help="the recorded rows, one JSON line each")
    args = ap.parse_args(argv)
    if args.overflow:
        bench_overflow_modes(shapes={"quick": (256, 64, 32, 8, 2)} if args.quick else OVERFLOW_SHAPES,
                             rounds=2 if args.quick else 7)
        print_table(args.json_out)
        return 0
    shape = QUICK if args.quick else QWEN3_30B_MINI
    bench_many_small_experts(**shape, rounds=2 if args.quick else 5)
    if args.skews:
        measure_skews(**shape, rounds=2 if args.quick else 3)
    return 0


if __name__ == "__main__":
    sys.exit(main())
