"""Where a DPOP train step's time goes, part by part, on both sides: jsmaug's compiled step (a `jax.profiler`
trace, each thunk's time given to a part by its ops' name scopes) and the HF transformers + PyTorch DPOP step
(`torch.profiler`) on the same model and batch, grouped the same way (jsmaug/perf/profile.py).

    python tools/profile_step.py [--pairs 4] [--length 256] [--steps 3] [--skip_torch] [--quick] [--trace_dir D]

Parts: attention; MoE routing/sort/gather/scatter; MoE expert matmuls; norms + RoPE; unembedding + log-probs;
the optimizer (+ clipping); other (embedding, loss, the layer scan's glue); and jsmaug's host time per step
(batch placement, the call's dispatch, `device_get` of the metrics). The model is tools/bench.py's 29.8M
step model (`--quick`: its tiny variant), the batch 4 pairs x 256 tokens, the second half of each row the
completion. The wall times are medians of steps timed alternately (jsmaug, PyTorch, jsmaug, ...).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jsmaug.models import decoder as model
from jsmaug.perf import bench, profile


def host_times(runner: bench.StepRunner, batch: dict, steps: int) -> dict[str, float]:
    """Median seconds per step of the host's own work: placing the numpy batch on the device, the jitted
    call's dispatch (until it returns, the step still running) and `device_get` of the metrics."""
    put, dispatch, get = [], [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        placed = jax.block_until_ready(jax.device_put(batch))
        t1 = time.perf_counter()
        runner.state, m = runner.fn(runner.state, placed, runner.ref, False)
        t2 = time.perf_counter()
        jax.block_until_ready(m)
        t3 = time.perf_counter()
        jax.device_get(m)
        t4 = time.perf_counter()
        put.append(t1 - t0)
        dispatch.append(t2 - t1)
        get.append(t4 - t3)
    return {"batch placement": float(np.median(put)), "dispatch": float(np.median(dispatch)),
            "device_get of the metrics": float(np.median(get))}


def profile_jax(runner: bench.StepRunner, hlo: str, steps: int, trace_dir: str) -> dict[str, float]:
    with jax.profiler.trace(trace_dir):
        for _ in range(steps):
            runner()
    return profile.group_jax(profile.trace_op_seconds(trace_dir), profile.hlo_parts(hlo), steps)


def profile_torch(one_step, config, steps: int) -> dict[str, float]:
    import torch
    from torch.profiler import ProfilerActivity

    with profile.torch_part_hooks(config.vocab_size, config.num_local_experts):
        one_step()  # the hooks' first run
        with torch.profiler.profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                one_step()
    return profile.group_torch(prof.events(), steps)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3, help="profiled steps per side (and 2x that timed)")
    ap.add_argument("--skip_torch", action="store_true")
    ap.add_argument("--quick", action="store_true", help="the tiny model (a smoke run)")
    ap.add_argument("--trace_dir", default=None, help="keep the jax.profiler trace here (default: a temp dir)")
    args = ap.parse_args(argv)
    config = bench.step_model_config(args.quick)
    batch = bench.synthetic_batch(np.random.default_rng(0), args.pairs, args.length, config.vocab_size)
    ref = model.init_params(config, jax.random.key(0))
    with profile.scopes():  # traced inside: the extra name scopes; the profile runs this very executable
        runner = bench.StepRunner(config, "dpop", batch, ref)
        compiled = runner.fn.lower(runner.state, runner.batch, runner.ref, False).compile()
    runner.fn = compiled
    contenders = {"jax": runner}
    torch_step = None
    if not args.skip_torch:
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
        torch_step = bench.torch_dpop_step(config, batch, args.pairs)
        torch_step()
        contenders["torch"] = torch_step
    wall = bench.time_alternating(contenders, 2 * args.steps)
    host = host_times(runner, bench.paired(batch), args.steps)
    with tempfile.TemporaryDirectory() as tmp:
        jax_parts = profile_jax(runner, compiled.as_text(), args.steps, args.trace_dir or tmp)
    torch_parts = profile_torch(torch_step, config, args.steps) if torch_step else None
    tokens = 2 * args.pairs * args.length
    print(f"# {bench.machine()}, jax {jax.__version__}, {config.num_params() / 1e6:.1f}M params, DPOP step, "
          f"{args.pairs} pairs x {args.length} tokens ({tokens} tokens), {args.steps} profiled steps per side")
    if torch_step:
        print(f"# tokens/s: jsmaug {tokens / wall['jax']:.0f}, PyTorch {tokens / wall['torch']:.0f} "
              f"(ratio {wall['torch'] / wall['jax']:.2f})")
    print(profile.table(jax_parts, torch_parts, wall["jax"], wall.get("torch"), host))
    return 0


if __name__ == "__main__":
    sys.exit(main())
