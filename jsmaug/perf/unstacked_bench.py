"""An experiment on issue 44's glue row: the DPOP step with each layer's params held apart (a list of per-layer
trees in the train state and the reference, the layers run by a Python loop: no `lax.scan`, no stacked weights to
slice, no stacked residuals to zero-fill and write) against the shipped step (one scan over the stacked layers)
and HF transformers + PyTorch, in alternating blocks; then a profile of both jsmaug steps, part by part, filed as
`tools/profile_step.py` files them (docs/performance.md, "The layers held apart"). About 5 minutes on the 2-core
CPU machine.

    python -m jsmaug.perf.unstacked_bench --json_out docs/bench_cpu_DATE_unstacked.json

The unstacked layout is not a feature: the loop is patched into `decoder.run_layers` while the step is traced,
and nothing else (checkpoints, shardings, conversion, LoRA) knows that layout.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from jsmaug.models import decoder as model
from jsmaug.perf import bench, dense_bench, profile
from jsmaug.train import step as step_lib


def unstack(params) -> dict:
    """`params` with every stack of layers (`params["layers"][kind]`, leading axis L) as a list of L trees."""
    out = dict(params)
    out["layers"] = {kind: [jax.tree.map(lambda a, i=i: a[i], tree) for i in range(jax.tree.leaves(tree)[0].shape[0])]
                     for kind, tree in params["layers"].items()}
    return out


@contextlib.contextmanager
def layer_loop():
    """While tracing: `decoder.run_layers` runs a kind given as a list of per-layer trees one layer after another
    (the MoE statistics stacked as the scan stacks them); stacked kinds go to the shipped scan."""
    shipped = model.run_layers

    def run_layers(config, layers, x, cos, sin, mask, token_mask, cache_index=None, cache=None):
        if cache is not None or not isinstance(next(iter(layers.values())), list):
            return shipped(config, layers, x, cos, sin, mask, token_mask, cache_index, cache)
        stats = []
        for kind, sparse, start, stop, _ in model.layer_segments(config):
            fn = model._layer_fn(config, sparse)
            for p in layers[kind][start:stop]:
                x, (st, _) = fn(p, x, cos, sin, mask, token_mask, None, None, None)
                if sparse:
                    stats.append(st)
        return x, (jax.tree.map(lambda *a: jnp.stack(a), *stats) if stats else model._empty_stats()), None

    model.run_layers = run_layers
    try:
        yield
    finally:
        model.run_layers = shipped


class UnstackedRunner:
    """`runner`'s step (a `bench.StepRunner`: same optimizer, loss, batch, initial params and reference) on
    unstacked params, one device, jitted without shardings; each call runs one step and waits for it."""

    def __init__(self, runner: bench.StepRunner):
        plan = runner.plan
        params = unstack(runner.state.params)
        self.state = step_lib.TrainState(params=params, opt_state=plan.optimizer.init(params), step=jnp.int32(0),
                                         skipped=jnp.int32(0), rng=runner.state.rng)
        self.batch = runner.batch
        self.ref = None if runner.ref is None else unstack(runner.ref)
        fn = jax.jit(functools.partial(step_lib.train_step, config=plan.mconf, loss_cfg=plan.cfg.loss,
                                       optimizer=plan.optimizer, chunk_size=plan.cfg.train.logps_chunk_size),
                     donate_argnums=0)
        with layer_loop():
            self.fn = fn.lower(self.state, self.batch, self.ref, False).compile()
        self.metrics = None
        self()

    def __call__(self):
        self.state, self.metrics = self.fn(self.state, self.batch, self.ref, False)
        jax.block_until_ready(self.metrics)


def _profile(runner, steps: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp):
            for _ in range(steps):
                runner()
        ops = profile.trace_op_seconds(tmp, module_prefix="jit_train_step")
    return {k: round(v * 1e3, 1) for k, v in profile.group_jax(ops, profile.hlo_parts(runner.fn.as_text()),
                                                                steps).items()}


def measure(config, blocks: int = 5, calls: int = 4, pairs: int = 4, length: int = 256, torch_too: bool = True,
            profile_steps: int = 0) -> dict:
    """Seconds per step of each contender, one figure per block, the ratios; with `profile_steps` the parts of
    both jsmaug steps (ms per step, thunk time)."""
    batch = bench.synthetic_batch(np.random.default_rng(0), pairs, length, config.vocab_size)
    ref = model.init_params(config, jax.random.key(0))
    compile_s = {}
    with profile.scopes():  # the profile's name scopes (the same ops), so the timed programs are the profiled ones
        t = time.perf_counter()
        scan = bench.StepRunner(config, "dpop", batch, ref)
        scan.fn = scan.fn.lower(scan.state, scan.batch, scan.ref, False).compile()
        compile_s["scan"] = round(time.perf_counter() - t, 1)
        t = time.perf_counter()
        fns = {"scan": scan, "unstacked": UnstackedRunner(bench.StepRunner(config, "dpop", batch, ref))}
        compile_s["unstacked"] = round(time.perf_counter() - t, 1)
    if torch_too:
        fns["torch"] = bench.torch_dpop_step(config, batch, pairs)
        fns["torch"]()
    times = bench.time_blocks(fns, blocks, calls)
    med = {k: float(np.median(v)) for k, v in times.items()}
    out = {"params_M": round(config.num_params() / 1e6, 1),
           "blocks_s": {k: [round(x, 3) for x in v] for k, v in times.items()},
           "median_s": {k: round(v, 3) for k, v in med.items()},
           "unstacked_speedup_per_block": [round(a / b, 3) for a, b in zip(times["scan"], times["unstacked"])],
           "compile_s": compile_s, "machine": bench.machine()}
    if torch_too:
        out["vs_torch"] = {k: round(med["torch"] / med[k], 3) for k in ("scan", "unstacked")}
    if profile_steps:
        out["parts_ms"] = {k: _profile(fns[k], profile_steps) for k in ("scan", "unstacked")}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json_out", default=None)
    ap.add_argument("--quick", action="store_true", help="tiny shapes, 2 blocks, no PyTorch (a smoke run)")
    args = ap.parse_args(argv)
    dense_bench.on_both_step_models(
        lambda kind, config: measure(config, blocks=2 if args.quick else 5, calls=2 if args.quick else 4,
                                     torch_too=not args.quick, profile_steps=3 if kind == "moe" else 0),
        args.quick, args.json_out, with_torch=not args.quick)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
