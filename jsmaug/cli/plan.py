"""Plan a TPU pod run without a pod: ahead-of-time compile the real DPOP train step for a TPU topology on a
CPU-only host (libtpu from PyPI: `pip install -e ".[tpu]"`), and print per-chip memory against HBM, the
compiled matmul FLOPs (counted from the HLO by jsmaug/perf/hlo_stats.py) against the analytic count, and the collective
bytes per step.

    jsmaug plan --topology v5p-128 [--config configs/smaug_mixtral_8x7b.yaml] [--dispatch both]
                             [key=value ...]

Overrides are the training config's (`mesh.fsdp=16 mesh.expert=4 train.batch_size=64 data.max_length=1024`).
Nothing is allocated: params, optimizer state, reference and batch are ShapeDtypeStructs with shardings.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import sys
import time
from pathlib import Path

os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jsmaug.perf import hlo_stats  # noqa: E402
from jsmaug.perf.flops import analytic_flops_per_step  # noqa: E402  # noqa: E402
from jsmaug.train import plan as plan_lib  # noqa: E402  # noqa: E402
from jsmaug.train.config import load_run_config  # noqa: E402

# name -> (topology name, chip config, chips per host, devices, HBM GiB per device, bf16 peak TFLOP/s per device)
TOPOLOGIES = {
    "v5p-8": ("v5:2x2x1", "megacore", (2, 2, 1), 4, 95, 459),
    "v5p-16": ("v5:2x2x2", "megacore", (2, 2, 1), 8, 95, 459),
    "v5p-32": ("v5:2x2x4", "megacore", (2, 2, 1), 16, 95, 459),
    "v5p-64": ("v5:2x4x4", "megacore", (2, 2, 1), 32, 95, 459),
    "v5p-128": ("v5:4x4x4", "megacore", (2, 2, 1), 64, 95, 459),
    "v5p-256": ("v5:4x4x8", "megacore", (2, 2, 1), 128, 95, 459),
    "v5e-8": ("v5e:2x4", "default", (2, 2, 1), 8, 16, 197),
    "v6e-8": ("v6e:2x4", "default", (2, 2, 1), 8, 32, 918),
    "v6e-64": ("v6e:8x8", "default", (2, 2, 1), 64, 32, 918),
    "v6e-256": ("v6e:16x16", "default", (2, 2, 1), 256, 32, 918),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--topology", required=True, choices=sorted(TOPOLOGIES))
    ap.add_argument("--config", default="configs/smaug_mixtral_8x7b.yaml")
    ap.add_argument("--dispatch", default="config", choices=["config", "both", "gspmd", "all_to_all"],
                    help="MoE token dispatch to compile: the config's (`auto` resolves as the run would), one of "
                         "them, or both side by side")
    ap.add_argument("--save_hlo", metavar="DIR", help="write each compiled program's optimized HLO text there "
                    "(TOPOLOGY-DISPATCH.hlo.txt; `python -m jsmaug.perf.hlo_stats FILE` counts it again)")
    ap.add_argument("--packed_fill", type=float, default=2.0, help="with data.packing=true: sequences per packed "
                    "row assumed for the plan (the rows per shard follow from it)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    cfg, _ = load_run_config(args.config, args.overrides)
    dispatches = {"config": [cfg.model.moe_dispatch], "both": ["gspmd", "all_to_all"]}.get(args.dispatch,
                                                                                        [args.dispatch])
    results = [plan(cfg, args.topology, d, args.save_hlo, args.packed_fill) for d in dispatches]
    if len(results) > 1:
        print("\n| dispatch | per-device memory (GiB) | temporaries (GiB) | matmul TFLOP (/ analytic) | "
              "collectives per step (GiB) | fits |\n|---|---|---|---|---|---|")
        for r in results:
            coll = ", ".join(f"{k} {v / 2 ** 30:.2f}" for k, v in sorted(r["collectives"].items())) or "-"
            total = "-" if math.isnan(r["total_gib"]) else f"{r['total_gib']:.2f}"
            flops = "-" if math.isnan(r["tflop"]) else f"{r['tflop']:.1f} ({r['ratio']:.2f})"
            print(f"| {r['dispatch']} | {total} | {r['temp_gib']:.2f} | {flops} | {coll} | "
                  f"{'yes' if r['fits'] else 'no'} |")
    return 0 if all(r["fits"] for r in results) else 1


def tpu_devices(topology: str):
    """The devices of a TPU topology, compiled for from this (CPU) host."""
    from jax.experimental import topologies

    topo_name, chip_cfg, per_host, n_dev = TOPOLOGIES[topology][:4]
    devices = topologies.get_topology_desc(platform="tpu", topology_name=topo_name, chip_config_name=chip_cfg,
                                           chips_per_host_bounds=per_host, num_slices=1).devices
    assert len(devices) == n_dev, (len(devices), n_dev)
    return devices


def planned_run(cfg, topology: str, dispatch: str, packed_fill: float):
    """The run's own plan (jsmaug.train.plan: the program training compiles, with this mesh's `auto` choices) and
    its batch, described."""
    devices = tpu_devices(topology)
    if cfg.model.moe_impl == "blocked":  # the CPU kernel has no TPU lowering worth planning; ragged is its TPU form
        cfg = dataclasses.replace(cfg, model=cfg.model.replace(moe_impl="ragged"))
    cfg = dataclasses.replace(cfg, model=cfg.model.replace(moe_dispatch=dispatch))
    rp = plan_lib.plan(cfg, devices)
    config = rp.config
    print(f"\n{topology}: {len(devices)} devices ({devices[0].device_kind}), mesh {dict(rp.mesh.shape)}, "
          f"{config.num_params() / 1e9:.1f}B params, batch {cfg.train.batch_size} pairs x {cfg.data.max_length} tokens")
    moe = (f"MoE: {rp.paths['moe']}, token dispatch {dispatch} -> {rp.paths['dispatch']}; " if config.is_moe
           else "dense MLP (no MoE, nothing routed); ")
    print(f"{moe}attention: {rp.paths['attention']} ({rp.paths['attention_why']})")
    print(rp.host_view(devices))
    if config.lora_rank:
        print(f"LoRA rank {config.lora_rank} on {list(config.lora_targets)}: "
              f"{sum(math.prod(x.shape) for x in jax.tree.leaves(rp.state.params)) / 1e6:.1f}M trained parameters, "
              f"base in {cfg.lora.base_dtype}")
    batch = rp.batch_shapes(packed_fill=packed_fill)
    if cfg.data.packing:
        m, rows, length = batch["input_ids"].shape
        print(f"packed: {m} x {rp.batch_divisor} groups of {rows // rp.batch_divisor} rows of {length} tokens "
              f"({packed_fill:g} sequences per row)")
    return rp, batch


def flop_figures(rp, counts: dict, n_dev: int) -> dict:
    """Analytic FLOPs per device (with remat's recomputed forward when remat is full) and the compiled matmuls'."""
    config, s = rp.config, rp.cfg.data.max_length
    tokens = 2 * rp.cfg.train.batch_size * s
    analytic = analytic_flops_per_step(config, tokens, s, with_reference=not rp.precomputed) / n_dev
    with_remat = analytic_flops_per_step(config, tokens, s, not rp.precomputed, remat_layers=True) / n_dev
    # all_to_all's ragged-dots run on a buffer of ep x the rows a shard receives when routing is balanced (its
    # worst case); the kernel computes only the rows its group sizes cover, so the useful count divides by ep.
    buffer = rp.mesh.shape["expert"] if rp.paths["dispatch"] == "all_to_all" else 1
    compiled = counts["dot"] + counts["ragged_dot"] / buffer
    remat = config.remat == "full"
    expected = with_remat if remat else analytic
    return {"tokens": tokens, "analytic": analytic, "with_remat": with_remat, "remat": remat, "buffer": buffer,
            "compiled": compiled, "ratio": compiled / max(expected, 1)}


def print_figures(mem, f: dict, counts: dict, flops_xla: float, hbm_gib: float, peak_tflops: float, n_dev: int):
    gib = 2 ** 30
    args_b, temp_b = mem.argument_size_in_bytes, mem.temp_size_in_bytes
    out_b, alias_b = mem.output_size_in_bytes, getattr(mem, "alias_size_in_bytes", 0)
    total = args_b + temp_b + out_b - alias_b
    print(f"per device: arguments {args_b / gib:.2f} GiB, temporaries {temp_b / gib:.2f} GiB, outputs "
          f"{out_b / gib:.2f} GiB (aliased {alias_b / gib:.2f}), total {total / gib:.2f} GiB of {hbm_gib} GiB HBM")
    buffer = f["buffer"]
    print(f"FLOPs per device per step: analytic (MaxText formula) {f['analytic'] / 1e12:.1f} TFLOP"
          + (f", {f['with_remat'] / 1e12:.1f} with remat's recomputed forward" if f["remat"] else "")
          + f"; compiled matmuls (jsmaug/perf/hlo_stats.py, loops x trip counts) {f['compiled'] / 1e12:.1f} TFLOP = "
          f"{f['ratio']:.2f} x the analytic{' with remat' if f['remat'] else ''} (dots "
          f"{counts['dot'] / 1e12:.1f} + grouped {counts['ragged_dot'] / 1e12:.1f}"
          + (f" / {buffer}: all_to_all's buffer holds {buffer}x the rows routed when balanced; megablox computes "
             "only the routed ones" if buffer > 1 else "")
          + f"); XLA's cost analysis says {flops_xla / 1e12:.1f} (it counts a loop body once)")
    if counts["unknown_trip_count_loops"]:
        print(f"  ({counts['unknown_trip_count_loops']} loops without a known trip count were counted once)")
    seconds = f["analytic"] / (0.5 * peak_tflops * 1e12)
    print(f"at 50% MFU a step would take {seconds:.2f}s ({f['tokens'] / seconds / n_dev:,.0f} tokens/s/device)")
    print("collectives per step (result bytes x executions): "
          + (", ".join(f"{k} {v / gib:.2f} GiB" for k, v in sorted(counts["collectives"].items())) or "none"))
    return total / gib, temp_b / gib


def plan(cfg, topology: str, dispatch: str, save_hlo: str | None = None, packed_fill: float = 2.0) -> dict:
    """AOT-compiles the step for `topology` with MoE `dispatch`; prints and returns its figures."""
    n_dev, hbm_gib, peak_tflops = TOPOLOGIES[topology][3:]
    rp, batch = planned_run(cfg, topology, dispatch, packed_fill)
    resolved, params = rp.paths["dispatch"], rp.state.params
    t0 = time.time()
    try:
        compiled = rp.lower(batch).compile()
    except jax.errors.JaxRuntimeError as err:
        if "RESOURCE_EXHAUSTED" not in str(err):
            raise
        print(f"compile refused after {time.time() - t0:.0f}s: {str(err).splitlines()[0]}")
        _largest(params, hbm_gib)
        need = re.search(r"required for HLO temporaries \(([0-9.]+)G\)", str(err))
        return {"dispatch": resolved, "total_gib": float("nan"), "fits": False, "tflop": float("nan"),
                "ratio": float("nan"), "temp_gib": float(need.group(1)) if need else float("nan"), "collectives": {}}
    print(f"compiled in {time.time() - t0:.0f}s")
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    hlo_text = compiled.as_text()
    if save_hlo:
        Path(save_hlo).mkdir(parents=True, exist_ok=True)
        (Path(save_hlo) / f"{topology}-{resolved}.hlo.txt").write_text(hlo_text)
    counts = hlo_stats.count(hlo_text)
    f = flop_figures(rp, counts, n_dev)
    total_gib, temp_gib = print_figures(compiled.memory_analysis(), f, counts,
                                        float(cost.get("flops", 0.0)) if cost else 0.0, hbm_gib, peak_tflops, n_dev)
    fits = total_gib <= hbm_gib
    if not fits:
        print(f"DOES NOT FIT: {total_gib:.1f} GiB > {hbm_gib} GiB per device.")
        _largest(params, hbm_gib)
    else:
        print("FITS")
    return {"dispatch": resolved, "total_gib": total_gib, "temp_gib": temp_gib, "tflop": f["compiled"] / 1e12,
            "ratio": f["ratio"], "collectives": counts["collectives"], "fits": fits}


def _largest(params, hbm_gib) -> None:
    gib = 2 ** 30
    print(f"DOES NOT FIT in {hbm_gib} GiB per device. Largest per-device parameters:")
    sizes = []
    for path, sds in jax.tree_util.tree_flatten_with_path(params)[0]:
        shard = sds.sharding.shard_shape(sds.shape)
        nbytes = jnp.dtype(sds.dtype).itemsize
        for d_ in shard:
            nbytes *= d_
        sizes.append((nbytes, jax.tree_util.keystr(path), shard))
    for nbytes, name, shard in sorted(sizes, reverse=True)[:5]:
        print(f"  {name} {shard}: {nbytes / gib:.2f} GiB (x3 with the Adam moments)")
    print("  temporaries dominate when the expert weights are gathered per layer (GSPMD dispatch); try: a larger "
          "expert/fsdp product, model.remat=full, fewer tokens per device, reference.mode=precomputed")


if __name__ == "__main__":
    sys.exit(main())
