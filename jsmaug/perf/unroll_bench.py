"""The DPOP step with the layer scan (`model.scan_unroll: 1`) and unrolled (`scan_unroll` = the layer count) against
HF transformers + PyTorch, in alternating blocks, for the MoE step model and the dense Llama-shaped one: the same
`bench.StepRunner` and `bench.torch_dpop_step` as the `torch/*` rows of tools/bench.py (docs/performance.md,
"The layer scan, unrolled"). About 6 minutes on the 2-core CPU machine.

    python -m jsmaug.perf.unroll_bench --json_out docs/bench_cpu_DATE_scan_unroll.json
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from jsmaug.models import decoder as model
from jsmaug.perf import bench, dense_bench


def measure(config, blocks: int = 5, calls: int = 4, pairs: int = 4, length: int = 256) -> dict:
    """Seconds per step of each contender, one figure per block, and the ratios."""
    batch = bench.synthetic_batch(np.random.default_rng(0), pairs, length, config.vocab_size)
    ref = model.init_params(config, jax.random.key(0))
    fns, compile_s = {}, {}
    for u in sorted({1, config.num_hidden_layers}):
        t = time.perf_counter()
        fns[f"unroll{u}"] = bench.StepRunner(config.replace(scan_unroll=u), "dpop", batch, ref)
        compile_s[str(u)] = round(time.perf_counter() - t, 1)
    fns["torch"] = bench.torch_dpop_step(config, batch, pairs)
    fns["torch"]()
    times = bench.time_blocks(fns, blocks, calls)
    med = {k: float(np.median(v)) for k, v in times.items()}
    ours = [k for k in med if k != "torch"]
    return {"params_M": round(config.num_params() / 1e6, 1), "layers": config.num_hidden_layers,
            "blocks_s": {k: [round(x, 3) for x in v] for k, v in times.items()},
            "median_s": {k: round(v, 3) for k, v in med.items()},
            "tokens_per_s": {k: round(2 * pairs * length / v, 1) for k, v in med.items()},
            "vs_torch": {k: round(med["torch"] / med[k], 3) for k in ours},
            "vs_torch_per_block": {k: [round(a / b, 3) for a, b in zip(times["torch"], times[k])] for k in ours},
            "compile_plus_first_step_s": compile_s, "machine": bench.machine()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json_out", default=None)
    ap.add_argument("--quick", action="store_true", help="tiny shapes, 2 blocks (a smoke run)")
    args = ap.parse_args(argv)
    dense_bench.on_both_step_models(
        lambda kind, config: measure(config, blocks=2 if args.quick else 5, calls=2 if args.quick else 4),
        args.quick, args.json_out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
