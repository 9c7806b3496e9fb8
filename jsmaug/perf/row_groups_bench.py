"""The log-prob kernel's rows laid end to end (`logps.sequence_logps_from_hidden(row_groups=...)`, what the trainer
does) against row by row (the kernel before 2026-12-07), in the DPO train step on issue 44's mild pairs, packed
(the run's layout) and padded, for the tiny config and the bench's MoE step model. Timed alternately in one
process (median of rounds); the losses of both ways are printed side by side. About 4 minutes on the 2-core CPU.

    python -m jsmaug.perf.row_groups_bench [--step_model] [--rounds 9] [--json_out FILE]
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import optax

from jsmaug.data import batches as data, packing
from jsmaug.models import config as cfg_lib, decoder as model, logps
from jsmaug.parallel import sharding as shd
from jsmaug.perf import bench
from jsmaug.perf.packing_bench import mild_pairs
from jsmaug.train import plan as plan_lib, step
from jsmaug.train.config import LossSection

TINY = dict(vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=512)  # tiny_dpo


def _batches(config, n: int = 4):
    """The first n steps of 8 mild pairs: packed as a run lays them (compile counted as 35 steps), and padded."""
    pairs = mild_pairs(160, 512, seed=1)
    ds = data.batches(pairs, 8, seed=0)
    steps = [ds[i] for i in range(40)]
    buckets = data.power_of_two_buckets(512)
    longest = max(max(packing.sequence_lengths(p)) for p in pairs)
    layout = packing.run_layout(steps, micro=1, shards=1, buckets=buckets, longest=longest, row_step=8,
                                compile_steps=35)
    mesh_cfg = shd.MeshConfig(data=1)
    mesh = shd.make_mesh(mesh_cfg, config, jax.devices()[:1])
    dc = data.DataConfig(train_path="x", packing=True)
    packed = [plan_lib.place_packed(steps[i], None, 1, mesh, mesh_cfg, dc, buckets, layout) for i in range(n)]
    padded = [shd.put_batch(data.collate(steps[i], buckets), mesh, mesh_cfg) for i in range(n)]
    return {"packed": packed, "padded": padded}


def measure(config, rounds: int = 9, label: str = "tiny") -> list[dict]:
    params = model.init_params(config, jax.random.key(0))
    ref = jax.tree.map(lambda x: x * 1.01, params)
    opt = optax.adamw(1e-3)
    grouped = logps.sequence_logps_from_hidden

    def runner(batches, by_rows: bool):
        logps.sequence_logps_from_hidden = (functools.partial(_row_by_row, grouped) if by_rows else grouped)
        try:
            fn = jax.jit(functools.partial(step.train_step, config=config, loss_cfg=LossSection(type="dpo", beta=0.3),
                                           optimizer=opt, chunk_size=bench.CHUNK))
            state = step.TrainState(params, opt.init(params), jnp.int32(0), jnp.int32(0),
                                    jax.random.key_data(jax.random.key(0)))
            compiled = fn.lower(state, batches[0], ref).compile()
        finally:
            logps.sequence_logps_from_hidden = grouped
        held = {"state": state, "i": 0, "loss": None}

        def call():
            held["state"], m = compiled(held["state"], batches[held["i"] % len(batches)], ref)
            held["i"] += 1
            jax.block_until_ready(m)
            if held["loss"] is None:
                held["loss"] = float(m["loss"])
        call()
        return call, held

    out = []
    for kind, batches in _batches(config).items():
        (a, ha), (b, hb) = runner(batches, False), runner(batches, True)
        t = bench.time_alternating({"grouped": a, "by_rows": b}, rounds)
        cfg = (f"{config.num_params() / 1e6:.1f}M params, DPO step, 8 mild pairs (issue 44's), {kind} "
               f"{tuple(batches[0]['input_ids'].shape)}; first-step loss {ha['loss']:.7f} grouped, "
               f"{hb['loss']:.7f} row by row")
        out.append(bench.record(f"logps/row_groups/{label}/{kind}", t["grouped"], t["by_rows"], "s", cfg,
                                "rows end to end (row_groups)", "row by row"))
    return out


def _row_by_row(kernel, *args, **kwargs):
    return kernel(*args, **{**kwargs, "row_groups": None})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--step_model", action="store_true", help="also the bench's 29.8M MoE step model")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--json_out", default=None)
    args = ap.parse_args(argv)
    measure(cfg_lib.tiny(**TINY), args.rounds, "tiny")
    if args.step_model:
        measure(bench.step_model_config(False), args.rounds, "step_model")
    bench.print_table(args.json_out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
