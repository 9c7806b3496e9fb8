"""The QLoRA rows of the CPU benchmark (issue 41's goals): the DPOP step of the bench's MoE step model with LoRA
rank 16 on every target over a float32 frozen base, against the same step over an NF4 base (group 64), side by
side in one process, in alternating blocks (`time_blocks`).

- qlora/step_time_vs_lora: seconds per step, NF4 base / float32 base (goal: at most 1.3x).
- qlora/base_bytes_vs_lora: the frozen base's bytes as the step receives them (packed values and scales of the
  projections and of the embedding and lm_head tables, and the unquantized norms and routers), NF4 / float32
  (goal: at most 0.3x); the row's config also gives the compiled step's argument and temporary bytes of both
  (the NF4 step's temporaries hold the unembedding dequantized whole, docs/training.md).

Run by `python tools/bench.py` (or `python -m jsmaug.perf.qlora_bench [--quick]` alone).
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jsmaug.models import decoder as model, lora, quant
from jsmaug.perf.bench import paired, record, record_blocks, step_model_config, synthetic_batch, time_blocks
from jsmaug.train import step
from jsmaug.train.config import LossSection

RANK, FMT, GROUP = 16, "nf4", 64


def tree_bytes(tree) -> int:
    leaves = jax.tree.leaves(tree, is_leaf=quant.is_quantized)
    return sum(x.nbytes if quant.is_quantized(x) else x.size * x.dtype.itemsize for x in leaves)


class LoraStep:
    """One LoRA DPOP step over a given frozen base (float32 or quantized); each call runs one step and waits."""

    def __init__(self, config, base, adapters, batch):
        opt = optax.adamw(1e-4, weight_decay=0.0)
        self.fn = jax.jit(functools.partial(step.train_step, config=config, optimizer=opt,
                                            loss_cfg=LossSection(type="dpop", beta=0.3, dpop_lambda=50.0)),
                          donate_argnums=0)
        fresh = jax.tree.map(lambda x: jnp.array(x, copy=True), adapters)  # the step donates its state
        self.state = step.TrainState(fresh, opt.init(fresh), jnp.int32(0), jnp.int32(0),
                                     jax.random.key_data(jax.random.key(0)))
        self.base, self.batch = base, batch
        compiled = self.fn.lower(self.state, batch, base).compile().memory_analysis()
        self.argument_bytes, self.temp_bytes = compiled.argument_size_in_bytes, compiled.temp_size_in_bytes
        self()  # compile + warm-up

    def __call__(self):
        self.state, m = self.fn(self.state, self.batch, self.base)
        jax.block_until_ready(m)


def bench_qlora_vs_lora(quick: bool = False, pairs: int = 4, length: int = 256, blocks: int = 5, calls: int = 3):
    config = step_model_config(quick).replace(lora_rank=RANK, lora_alpha=2.0 * RANK)
    group = min(GROUP, config.resolved_head_dim)  # o_proj's contracted axis is head_dim (16 in the quick model)
    base, adapters = lora.split(model.init_params(config, jax.random.key(0)))
    adapters = jax.tree.map(lambda x: x + 0.01, adapters)  # B away from 0: the adapters' matmuls are not skipped
    qbase = jax.jit(functools.partial(lora.quantize_base, fmt=FMT, group=group))(base)
    batch = paired(synthetic_batch(np.random.default_rng(0), pairs, length, config.vocab_size))
    runners = {"lora": LoraStep(config, base, adapters, batch), "qlora": LoraStep(config, qbase, adapters, batch)}
    t = time_blocks(runners, blocks, calls)
    shape = (f"step model {'quick' if quick else '29.8M'} (MoE, bucketed), LoRA r{RANK} on {len(config.lora_targets)} "
             f"targets, DPOP, {pairs} pairs x {length}, {FMT} group {group}")
    record_blocks("qlora/step_time_vs_lora", t["qlora"], t["lora"], "s/step", shape, f"{FMT} base", "float32 base")
    lo, q = runners["lora"], runners["qlora"]
    memory = (f"; compiled step arguments {q.argument_bytes:,} vs {lo.argument_bytes:,} B, temporaries "
              f"{q.temp_bytes:,} vs {lo.temp_bytes:,} B")
    return record("qlora/base_bytes_vs_lora", tree_bytes(qbase), tree_bytes(base), "bytes", shape + memory,
                  f"{FMT} base", "float32 base")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the tiny step model (a smoke run)")
    args = ap.parse_args()
    bench_qlora_vs_lora(quick=args.quick)
