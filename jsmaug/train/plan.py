"""The plan of a run: which program a run compiles, decided in one place.

`plan(cfg, devices) -> RunPlan` is pure and abstract: the resolved model config, the mesh, the param, reference
and state shardings, the optimizer, the abstract state (`eval_shape`), the batch's shapes and shardings, the
placement of a batch and the jitted step. Nothing is allocated, so the same plan serves a CPU test, a training
run (`materialize` then brings the real params, the reference and the restored checkpoint: `jsmaug.train.setup`),
`jsmaug plan` / `tools/plan_pod.py` (AOT-compiled for a TPU topology from a CPU host), the benches and
`tools/profile_step.py`. A test lowers the plan's step and the training run's step and compares their HLO.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jsmaug.data import batches as data_lib, packing
from jsmaug.losses import config as loss_config
from jsmaug.models import attention, decoder as model, lora, quant
from jsmaug.models.config import ConfigError, ModelConfig
from jsmaug.parallel import expert_parallel, sharding as shd
from jsmaug.train import step as step_lib
from jsmaug.train.config import RunConfig

# Fields a run may change on resume (numerics and dispatch); every other model field must match the checkpoint.
RESUMABLE_MODEL_CHANGES = ("dtype", "remat", "scan_unroll", "moe_impl", "moe_block_size", "moe_capacity_factor", "moe_token_chunks", "moe_dispatch",
                           "attention_impl", "attention_block_size", "shared_prompt_masks")
PADDED_KEYS = ("input_ids", "segment_ids", "positions", "labels", "loss_mask")


def _sds(shape, dtype, sharding) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype), sharding=sharding)


def place_packed(pairs, ref_table, micro: int, mesh, mesh_cfg, data_cfg, buckets, run_length=None) -> dict:
    """A step's pairs packed (`jsmaug.data.packing`) and placed: each process lays out the rows of the data shards
    its devices hold; the per-pair arrays (dataset index, precomputed reference) are small and whole everywhere.
    `run_length`: the run's layout (`packing.run_layout`), where data.packing_length is not set."""
    shards = shd.batch_rows_divisor(mesh, mesh_cfg)
    layout = packing.plan(pairs, micro=micro, shards=shards, buckets=buckets, row_length=data_cfg.packing_length,
                          run_length=run_length, shared=data_cfg.share_prompt)
    mine = shd.pairs_by_host(mesh, mesh_cfg, shards)[jax.process_index()]
    r = layout.rows_per_group
    placed = shd.place_rows(packing.materialize(pairs, layout, mine), [d * r + i for d in mine for i in range(r)],
                            shards * r, mesh, mesh_cfg)
    index = np.array([p["index"] for p in pairs], np.int32)
    per_pair = {"pair_index": np.stack([index, index])}
    if ref_table is not None:
        per_pair["ref_logps"] = np.stack([ref_table[index, 0], ref_table[index, 1]]).astype(np.float32)
    return placed | shd.place_rows(per_pair, list(range(len(pairs))), len(pairs), mesh, mesh_cfg)


def with_ref(pairs, buckets, ref_table: np.ndarray | None, length: int) -> dict[str, np.ndarray]:
    """Collated pairs at `length`, with their precomputed reference logps when there is a table (pairs carry
    their dataset `index`)."""
    batch = data_lib.collate(pairs, buckets, length)
    if ref_table is not None:
        idx = np.array([p["index"] for p in pairs], np.int64)
        batch["ref_logps"] = np.concatenate([ref_table[idx, 0], ref_table[idx, 1]]).astype(np.float32)
    return batch


def place(pairs, ref_table, micro: int, mesh, mesh_cfg, data_cfg, buckets, run_length=None) -> dict:
    """A global batch of pairs on the mesh, packed or padded as `data_cfg` says."""
    if data_cfg.packing:
        return place_packed(pairs, ref_table, micro, mesh, mesh_cfg, data_cfg, buckets, run_length)
    length = data_lib.batch_length(pairs, buckets)
    return shd.put_pairs(pairs, functools.partial(with_ref, buckets=buckets, ref_table=ref_table, length=length),
                         mesh, mesh_cfg)


@dataclasses.dataclass
class RunPlan:
    """One run's program, abstract. `state` and `reference` are ShapeDtypeStructs carrying their shardings."""
    cfg: RunConfig
    config: ModelConfig  # the resolved model config (`model_config(cfg)`, or what training read from init_from)
    mesh: Any
    paths: dict[str, str]  # attention, moe, dispatch: the paths `auto` resolves to on this mesh, with reasons
    param_sh: Any  # the trained params' shardings (the adapters with LoRA)
    ref_sh: Any  # the reference's (with LoRA: the frozen base's)
    state_sh: step_lib.TrainState
    optimizer: Any
    schedule: Callable
    state: step_lib.TrainState
    reference: Any  # the reference weights the step takes, or None (precomputed, or a reference-free loss)
    objective: Any
    step: Callable  # the jitted train step: step(state, batch, reference, inject_nan) -> (state, metrics)

    @property
    def mconf(self) -> ModelConfig:
        """The former name of `config` (kept for users' code; read-only)."""
        return self.config

    @property
    def precomputed(self) -> bool:
        return self.cfg.reference.mode == "precomputed" and self.objective.needs_reference

    @property
    def step_ref_sh(self):
        return None if self.reference is None else self.ref_sh

    @property
    def batch_divisor(self) -> int:
        return shd.batch_rows_divisor(self.mesh, self.cfg.mesh)

    def batch_sharding(self, ndim: int):
        return shd.batch_sharding(self.mesh, self.cfg.mesh, ndim)

    def batch_shapes(self, length: int | None = None, packed_fill: float = 2.0) -> dict:
        """The step's batch as ShapeDtypeStructs: padded (2, B, S) rows, or with data.packing=true packed rows
        (M, D x R, L) of `length` tokens (default data.packing_length or data.max_length), R the rows a data
        shard needs when each holds `packed_fill` sequences."""
        b, m, d = self.cfg.train.batch_size, self.cfg.train.micro_batches, self.batch_divisor
        s = length or self.cfg.data.packing_length or self.cfg.data.max_length
        if self.cfg.data.packing:
            rows = max(1, math.ceil(2 * b / (m * d) / packed_fill))
            out = {k: _sds((m, d * rows, s), jnp.int32, self.batch_sharding(3)) for k in packing.ROW_KEYS}
            out["pair_index"] = _sds((2, b), jnp.int32, self.batch_sharding(2))
        else:
            out = {k: _sds((2, b, s), jnp.int32, self.batch_sharding(3)) for k in PADDED_KEYS}
        if self.precomputed:
            out["ref_logps"] = _sds((2, b), jnp.float32, self.batch_sharding(2))
        return out

    def place(self, pairs, buckets, ref_table=None, micro: int = 1, run_length: int | None = None) -> dict:
        return place(pairs, ref_table, micro, self.mesh, self.cfg.mesh, self.cfg.data, buckets, run_length)

    def lower(self, batch: dict | None = None):
        """The step lowered on the abstract state (and `batch`, default `batch_shapes()`)."""
        batch = self.batch_shapes() if batch is None else batch
        return self.step.lower(self.state, batch, self.reference, jax.ShapeDtypeStruct((), jnp.bool_))

    def host_view(self, devices=None) -> str:
        """The run as its hosts see it: one JAX process per host, and the pairs of each step each one loads."""
        devices = list(self.mesh.devices.flat) if devices is None else devices
        hosts = sorted({d.process_index for d in devices})
        per_host = shd.pairs_by_host(self.mesh, self.cfg.mesh, self.cfg.train.batch_size)
        counts = sorted({len(v) for v in per_host.values()})
        shared = len(per_host) > 1 and len({tuple(v) for v in per_host.values()}) < len(per_host)
        return (f"hosts: {len(hosts)} (one JAX process each, distributed.enabled=true), "
                f"{len(devices) // len(hosts)} devices per host; pairs per host per step: "
                f"{'-'.join(map(str, counts))} of {self.cfg.train.batch_size}"
                + (" (hosts share rows: a batch axis does not span them)" if shared else ""))

    def describe(self) -> str:
        m, p = self.config, self.paths
        experts = (f"{m.num_local_experts} experts (top-{m.num_experts_per_tok}), moe_impl={m.moe_impl} -> "
                   f"{p['moe']}, moe_dispatch={m.moe_dispatch} -> {p['dispatch']}, ") if m.is_moe else "dense MLP, "
        return (f"model: {m.model_type}, {m.num_params() / 1e6:.2f}M parameters, {m.num_hidden_layers} layers, "
                f"{experts}attention_impl={m.attention_impl} -> {p['attention']} ({p['attention_why']}); "
                f"mesh {dict(self.mesh.shape)}")


def model_config(cfg: RunConfig, stored: ModelConfig | None = None) -> ModelConfig:
    """The model config: `stored` (init_from's architecture, read by the caller) with this run's numerics
    settings, or `model`; with the `lora` section's adapters."""
    lora_fields = dict(lora_rank=cfg.lora.rank, lora_alpha=cfg.lora.alpha, lora_targets=tuple(cfg.lora.targets))
    if stored is None:
        return cfg.model.replace(**lora_fields)
    return stored.replace(**{k: getattr(cfg.model, k) for k in RESUMABLE_MODEL_CHANGES}, **lora_fields)


def longest_row(data: data_lib.DataConfig) -> int:
    """The longest row a batch of this data can have: `max_length`, or packed, `packing_length` or the packing
    ladder's top (twice the bucket)."""
    if not data.packing:
        return data.max_length
    return data.packing_length or 2 * data.max_length


def resolved_paths(config: ModelConfig, mesh, row_len: int | None = None) -> dict[str, str]:
    """What `auto` becomes on this mesh's platform (a TPU topology compiled from a CPU host is TPU) for rows of
    up to `row_len` tokens (None: not known)."""
    platform = next(iter(mesh.devices.flat)).platform
    attn, why = attention.resolve_impl(config.attention_impl, config.dtype, config.resolved_head_dim, platform,
                                       seq_len=row_len, block_size=config.attention_block_size,
                                       sinks=config.attention_sinks)
    return {"attention": attn, "attention_why": why,
            "moe": expert_parallel.resolve_local_impl(config.moe_impl, config.moe_dispatch, mesh),
            "dispatch": expert_parallel.resolve_dispatch(config.moe_dispatch, mesh, config.moe_impl)}


def check_shared_prompts(config: ModelConfig, mesh) -> None:
    """data.share_prompt's limit, named before anything is built: no splash kernel (it takes plain segment ids
    only: set model.attention_impl=chunked). Sliding windows are measured by `segments.window_index`."""
    attn = resolved_paths(config, mesh)["attention"]
    if attn == "splash":
        raise ConfigError("data.share_prompt: the splash kernel takes plain segment ids only; set "
                          "model.attention_impl=chunked (or xla) to share prompts")


def quantized_base(cfg: RunConfig, base, base_sh):
    """(shardings, abstract tree) of the frozen base in `lora.base_quant` storage (QLoRA): each quantized
    weight's packed values and scales shard like the weight they replace. Checks every weight's shape first: a
    group that does not divide a contracted axis is refused here, naming the weight, before anything is built."""
    try:
        shapes = jax.eval_shape(lambda b: lora.quantize_base(b, cfg.lora.base_quant, cfg.lora.base_quant_group),
                                base)
    except quant.QuantError as e:
        raise ConfigError(f"lora.base_quant_group: {e}") from None
    sh = jax.tree.map(lambda s, w: quant.fit_sharding(s, w) if quant.is_quantized(s) else w, shapes, base_sh,
                      is_leaf=quant.is_quantized)
    return sh, jax.tree.map(lambda s, w: _sds(s.shape, s.dtype, w), shapes, sh)


def plan(cfg: RunConfig, devices=None, config: ModelConfig | None = None, *,
         mconf: ModelConfig | None = None) -> RunPlan:
    """The run's program on `devices` (default: all of this process's view). `config` (the model config) defaults
    to `model_config(cfg)` without init_from's stored architecture (training passes the one it read). `mconf` is
    `config`'s former name: deprecated, still accepted with the same meaning, so users' code keeps working."""
    if mconf is not None:
        if config is not None:
            raise TypeError("plan(): the model config given twice, as `config` and as `mconf` (its former name)")
        warnings.warn("plan(mconf=...) is deprecated: pass the model config as config=...", DeprecationWarning,
                      stacklevel=2)
        config = mconf
    config = model_config(cfg) if config is None else config
    mesh = shd.make_mesh(cfg.mesh, config, devices)
    if cfg.data.share_prompt:
        check_shared_prompts(config, mesh)
        config = config.replace(shared_prompt_masks=True)
    divisor = shd.batch_rows_divisor(mesh, cfg.mesh)
    if cfg.train.batch_size % divisor or (cfg.train.batch_size // cfg.train.micro_batches) % divisor:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} (per micro-batch "
                          f"{cfg.train.batch_size // cfg.train.micro_batches}) must be divisible by the "
                          f"data-parallel mesh size {divisor} (data x fsdp x expert)")
    objective = loss_config.objective(cfg.loss)
    shapes = model.param_shapes(config)
    all_sh = shd.param_shardings(config, mesh, cfg.mesh)
    if config.lora_rank:  # trained: the adapters; the frozen base (the policy's base and the reference) is an input
        (base_shapes, shapes), (ref_sh, param_sh) = lora.split(shapes), lora.split(all_sh)
        reference = jax.tree.map(lambda s, sh: _sds(s.shape, cfg.lora.base_dtype, sh), base_shapes, ref_sh)
        if cfg.lora.base_quant != "none":
            ref_sh, reference = quantized_base(cfg, reference, ref_sh)
    else:
        param_sh = ref_sh = all_sh
        needs_weights = objective.needs_reference and cfg.reference.mode != "precomputed"
        reference = jax.tree.map(lambda s, sh: _sds(s.shape, cfg.reference.dtype, sh), shapes,
                                 param_sh) if needs_weights else None
    params = jax.tree.map(lambda s, sh: _sds(s.shape, s.dtype, sh), shapes, param_sh)
    optimizer, schedule = step_lib.make_optimizer(cfg.train)
    state_sh = step_lib.state_shardings(optimizer, params, param_sh, mesh)
    opt = jax.tree.map(lambda s, sh: _sds(s.shape, s.dtype, sh), jax.eval_shape(optimizer.init, params),
                       state_sh.opt_state)
    rep = NamedSharding(mesh, PartitionSpec())
    scalar = _sds((), jnp.int32, rep)
    state = step_lib.TrainState(params, opt, scalar, scalar, _sds((2,), jnp.uint32, rep))
    out = RunPlan(cfg=cfg, config=config, mesh=mesh, paths=resolved_paths(config, mesh, longest_row(cfg.data)),
                  param_sh=param_sh, ref_sh=ref_sh, state_sh=state_sh, optimizer=optimizer, schedule=schedule, state=state,
                  reference=reference, objective=objective, step=None)
    batch_sh = jax.tree.map(lambda x: x.sharding, out.batch_shapes())
    out.step = step_lib.jit_train_step(state_sh, batch_sh, out.step_ref_sh, config=config, loss_cfg=cfg.loss,
                                       optimizer=optimizer, micro_batches=cfg.train.micro_batches,
                                       chunk_size=cfg.train.logps_chunk_size)
    return out
