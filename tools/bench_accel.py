"""The accelerator benchmark (GPU or TPU; `tools/bench.py` runs it when the backend is one), side by side in one run.

    python tools/bench.py                        # on a GPU/TPU machine: this mode
    python tools/bench_accel.py [--quick] [--skip_torch] [--skip_long] [--json_out FILE]

Figures (one JSON line each, then a table; see `bench_lib.record`):
  peak/*     measured bf16 matmul rate (8192^3) against the nominal bf16 peak of the card
  moe/*      MoE layer fwd+bwd in bf16 (16384 tokens, 2048 -> 5632, top-2 of 8): every dispatch path against one
             dense matmul of the same useful FLOPs, useful TFLOP/s
  attn/*     attention fwd+bwd at 4096 tokens (bf16): chunked, and cudnn (GPU) or splash (TPU), against xla; time
             and compiled memory
  step/*     the 2.45B preset's DPOP step (8 pairs x 1024, bf16 compute, f32 master weights, online bf16 reference)
             with the `auto` choices: tokens/s against HF transformers + PyTorch on the same device (sdpa, bf16
             autocast, fused AdamW), MFU against the measured and the nominal peak, peak device memory of each
  long/*     the same at 2 pairs x 4096 tokens
`--quick` shrinks every shape so the script runs anywhere (CPU included) in a minute: a smoke run, not figures.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jsmaug.models import attention, config as cfg_lib, decoder as model, moe  # noqa: E402
from jsmaug.perf import bench
from jsmaug.perf.flops import analytic_flops_per_step
from jsmaug.train import step
from jsmaug.train.config import LossSection, TrainSection  # noqa: E402


def preset_2p45b(quick: bool):
    """The configuration of issue 14's H200 measurements: hidden 2048, mlp 5632, 8 layers, 16/8 heads, 8 experts
    top-2, vocab 32000, bf16 compute, f32 master weights (2.45B parameters)."""
    if quick:
        return cfg_lib.tiny(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
                            max_position_embeddings=4096, dtype="bfloat16", attention_block_size=64)
    return cfg_lib.ModelConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=8,
                                 num_attention_heads=16, num_key_value_heads=8, num_local_experts=8,
                                 num_experts_per_tok=2, max_position_embeddings=4096, dtype="bfloat16",
                                 param_dtype="float32")


def device_peak_gib() -> float | None:
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2 ** 30


def compiled_gib(jitted, *args) -> float:
    m = jitted.lower(*args).compile().memory_analysis()
    if m is None:
        return float("nan")
    return (m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes
            - getattr(m, "alias_size_in_bytes", 0)) / 2 ** 30


def bench_peak(quick: bool) -> tuple[float, float]:
    n = 512 if quick else 8192
    a = jnp.ones((n, n), jnp.bfloat16)
    measured = 2 * n ** 3 / bench.timeit(jax.jit(lambda x, y: x @ y), a, a)
    kind = jax.devices()[0].device_kind
    nominal = next((v for k, v in bench.NOMINAL_BF16_PEAK.get(jax.default_backend(), {}).items() if k in kind),
                   measured)
    bench.record("peak/bf16_matmul_vs_nominal", measured / 1e12, nominal / 1e12, "TFLOP/s", f"{n}^3 bf16",
                 "measured", f"nominal ({kind})")
    return measured, nominal


def bench_moe(quick: bool) -> None:
    t, d, f, e, k = (512, 64, 128, 8, 2) if quick else (16384, 2048, 5632, 8, 2)
    ks = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(ks[0], (t, d), jnp.bfloat16)
    logits = jax.random.normal(ks[1], (t, e))
    ws = [jax.random.normal(kk, s, jnp.bfloat16) * 0.02 for kk, s in zip(ks[2:], [(e, d, f), (e, d, f), (e, f, d)])]
    useful = 3 * t * k * 3 * 2 * d * f

    def layer(impl):
        def loss(x, w1, w3, w2):
            _, idx, w = moe.route(logits, k)
            y, _ = moe.expert_ffn(x, idx, w.astype(x.dtype), w1, w3, w2, impl=impl)
            return jnp.sum(y.astype(jnp.float32) ** 2)
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))

    def dense_equiv(x, w1, w3, w2):
        return jnp.sum(moe.glu_ffn(jnp.tile(x, (k, 1)), w1[0], w3[0], w2[0], x.dtype).astype(jnp.float32) ** 2)

    fns = {"dense_matmul": jax.jit(jax.grad(dense_equiv, argnums=(0, 1, 2, 3)))}
    impls = ("bucketed", "capacity", "ragged", "dense", "blocked") + (("megablox",) if jax.default_backend() == "tpu"
                                                                      else ())
    fns.update({impl: layer(impl) for impl in impls})
    calls = {n: (lambda fn=fn: jax.block_until_ready(fn(x, *ws))) for n, fn in fns.items()}
    for c in calls.values():
        c()
    rates = {n: useful / s / 1e12 for n, s in bench.time_alternating(calls, 5).items()}
    cfg = f"T={t} D={d} F={f} E={e} top-{k} bf16 fwd+bwd; auto -> {moe.resolve_impl('auto')}"
    for impl in impls:
        bench.record(f"moe/{impl}_vs_dense_matmul", rates[impl], rates["dense_matmul"], "useful TFLOP/s", cfg,
                     f"moe_impl={impl}", "one dense matmul, same useful FLOPs")


def bench_attention(quick: bool) -> None:
    b, s, h, kv, dh = (1, 512, 4, 2, 64) if quick else (2, 4096, 16, 8, 128)
    ks = jax.random.split(jax.random.key(1), 3)
    q = jax.random.normal(ks[0], (b, s, h, dh), jnp.bfloat16)
    kk = jax.random.normal(ks[1], (b, s, kv, dh), jnp.bfloat16)
    v = jax.random.normal(ks[2], (b, s, kv, dh), jnp.bfloat16)
    seg = jnp.ones((b, s), jnp.int32)
    paths = ["xla", "chunked"] + {"gpu": ["cudnn"], "tpu": ["splash"]}.get(jax.default_backend(), [])

    def grad_fn(impl):
        def loss(q, k, v):
            out = attention.self_attention(q, k, v, seg, implementation=impl, dtype="bfloat16")
            return jnp.sum(out.astype(jnp.float32) ** 2)
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))

    fns = {p: grad_fn(p) for p in paths}
    mem = {p: compiled_gib(fn, q, kk, v) for p, fn in fns.items()}
    calls = {p: (lambda fn=fn: jax.block_until_ready(fn(q, kk, v))) for p, fn in fns.items()}
    for c in calls.values():
        c()
    secs = bench.time_alternating(calls, 5)
    cfg = f"B={b} S={s} H={h}/{kv} Dh={dh} bf16 causal fwd+bwd"
    for p in paths[1:]:
        bench.record(f"attn/{p}_vs_xla_time", secs[p] * 1e3, secs["xla"] * 1e3, "ms", cfg, p, "xla")
        bench.record(f"attn/{p}_vs_xla_memory", mem[p], mem["xla"], "GiB compiled", cfg, p, "xla")


def bench_step(name, config, pairs, length, peaks, skip_torch, rounds=4) -> None:
    rng = np.random.default_rng(0)
    batch = bench.synthetic_batch(rng, pairs, length, config.vocab_size)
    ref = jax.jit(lambda p: jax.tree.map(lambda x: x.astype(jnp.bfloat16), p))(
        model.init_params(config, jax.random.key(0)))
    runner = bench.StepRunner(config, "dpop", batch, ref)
    opt, _ = step.make_optimizer(TrainSection(steps=100, learning_rate=1e-5, schedule="constant"))
    jitted = jax.jit(functools.partial(step.train_step, config=config, loss_cfg=LossSection(type="dpop", beta=0.3),
                                       optimizer=opt, chunk_size=bench.CHUNK))
    jax_gib = compiled_gib(jitted, runner.state, batch, ref, False)
    fns = {"jax": runner}
    torch_gib = None
    if not skip_torch:
        try:
            import torch

            dev = "cuda" if torch.cuda.is_available() else "cpu"
            one = bench.torch_dpop_step(config, batch, pairs, device=dev, bf16=True)
            one()
            if dev == "cuda":
                torch.cuda.reset_peak_memory_stats()
            fns["torch"] = one
        except Exception as err:  # noqa: BLE001 - e.g. PyTorch out of memory: say so, keep jsmaug's figures
            print(json.dumps({"name": f"{name}/torch", "error": f"{type(err).__name__}: {str(err)[:200]}"}))
    t = bench.time_alternating(fns, rounds)
    if "torch" in fns and torch.cuda.is_available():
        torch_gib = torch.cuda.max_memory_allocated() / 2 ** 30
    tokens = 2 * pairs * length
    flops = analytic_flops_per_step(config, tokens, length, with_reference=True)
    cfg = (f"{config.num_params() / 1e9:.2f}B params, {pairs} pairs x {length}, bf16, DPOP online bf16 reference; "
           f"moe auto -> {moe.resolve_impl(config.moe_impl)}, attention auto -> "
           f"{attention.resolve_impl(config.attention_impl, config.dtype, config.resolved_head_dim)[0]}")
    if "torch" in t:
        bench.record(f"{name}/jsmaug_vs_pytorch", tokens / t["jax"], tokens / t["torch"], "tokens/s", cfg,
                     "jsmaug DPOP step", "HF transformers + PyTorch DPOP step")
        if torch_gib is not None:
            bench.record(f"{name}/memory_jsmaug_vs_pytorch", jax_gib, torch_gib, "GiB", cfg,
                         "jsmaug compiled step (args + temps + outputs)", "PyTorch max allocated")
    else:
        bench.record(f"{name}/jsmaug_tokens_per_s", tokens / t["jax"], 1.0, "tokens/s", cfg, "jsmaug DPOP step", "-")
        bench.record(f"{name}/memory_jsmaug", jax_gib, 1.0, "GiB", cfg, "jsmaug compiled step", "-")
    bench.record(f"{name}/mfu_measured_peak", flops / t["jax"] / 1e12, peaks[0] / 1e12, "TFLOP/s", cfg,
                 "model FLOPs (MaxText formula) / step time", "measured bf16 matmul peak")
    bench.record(f"{name}/mfu_nominal_peak", flops / t["jax"] / 1e12, peaks[1] / 1e12, "TFLOP/s", cfg,
                 "model FLOPs (MaxText formula) / step time", "nominal bf16 peak")
    if device_peak_gib() is not None:
        print(json.dumps({"name": f"{name}/device_peak_so_far_gib", "value": device_peak_gib()}), flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny shapes: a smoke run anywhere, not figures")
    ap.add_argument("--skip_torch", action="store_true")
    ap.add_argument("--skip_long", action="store_true", help="skip the 2 pairs x 4096 case")
    ap.add_argument("--json_out", default=None)
    args = ap.parse_args(argv)
    q = args.quick
    print(f"# jsmaug accelerator bench on {bench.machine()}, jax {jax.__version__}, {time.strftime('%Y-%m-%d')}",
          flush=True)
    peaks = bench_peak(q)
    bench_moe(q)
    bench_attention(q)
    config = preset_2p45b(q)
    bench_step("step", config, *((2, 64) if q else (8, 1024)), peaks, args.skip_torch)
    if not args.skip_long:
        bench_step("long", config, *((1, 256) if q else (2, 4096)), peaks, args.skip_torch)
    bench.print_table(args.json_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
