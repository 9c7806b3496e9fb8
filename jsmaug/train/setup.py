"""A training run's second phase: the mesh, the model, the reference, the optimizer and the restored state.

Every check that can refuse the run (another model in the workdir, a batch the mesh cannot split, an unwritable
workdir) comes before anything is written. The reference is the starting policy, frozen: a copy that is never
given to the optimizer (with LoRA, the frozen base itself). On resume it is rebuilt from `init_from` (or from
the seed for a random init), so it is not stored twice.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import numpy as np
from etils import epath

from jsmaug.data import batches as data_lib, packing

from jsmaug.losses import config as loss_config

from jsmaug.models import attention, lora, decoder as model

from jsmaug.parallel import expert_parallel

from jsmaug.train import checkpoint as ckpt
from jsmaug.parallel import sharding as shd
from jsmaug.train import step as step_lib
from jsmaug.models.config import ConfigError, MixtralConfig
from jsmaug.train.metrics_log import log
from jsmaug.paths import absolute
from jsmaug.train.config import RunConfig

# Fields a run may change on resume (numerics and dispatch); every other model field must match the checkpoint.
RESUMABLE_MODEL_CHANGES = ("dtype", "remat", "moe_impl", "moe_block_size", "moe_capacity_factor", "moe_dispatch",
                           "attention_impl", "attention_block_size")


def model_config(cfg: RunConfig) -> MixtralConfig:
    """The model config: `init_from`'s architecture (with this run's numerics settings), or `model`; with the
    `lora` section's adapters."""
    lora_fields = dict(lora_rank=cfg.lora.rank, lora_alpha=cfg.lora.alpha, lora_targets=tuple(cfg.lora.targets))
    if not cfg.init_from:
        return cfg.model.replace(**lora_fields)
    if not epath.Path(cfg.init_from).exists():
        raise ConfigError(f"init_from: {cfg.init_from}: no such file or folder")
    stored = ckpt.read_model_config(cfg.init_from)
    if stored.to_hf_dict() != cfg.model.replace(param_dtype=stored.param_dtype).to_hf_dict():
        log(f"note: init_from {cfg.init_from} carries its own architecture; using it instead of `model`")
    return stored.replace(**{k: getattr(cfg.model, k) for k in RESUMABLE_MODEL_CHANGES}, **lora_fields)


def check_resume(checkpoints: epath.Path, workdir, mconf: MixtralConfig) -> None:
    """Refuses, before anything is written, to resume a workdir whose checkpoints hold another model."""
    found = ckpt.stored_model_config(checkpoints)
    if found is None:
        return
    step, stored = found
    stored = MixtralConfig.from_dict(stored).to_dict()  # JSON lists back to tuples, defaults for newer fields
    want = mconf.to_dict()
    diff = [f"model.{k}: stored {stored.get(k)!r}, requested {want[k]!r}" for k in sorted(want)
            if k not in RESUMABLE_MODEL_CHANGES and stored.get(k) != want[k]]
    if diff:
        raise ConfigError(f"{workdir} holds checkpoints of another model (step {step}); " + "; ".join(diff)
                          + ". Use another workdir, or the stored values to resume")


def lora_meta(cfg: RunConfig, mconf: MixtralConfig) -> dict:
    """What a LoRA checkpoint says about its base: where the base came from (it is not stored again)."""
    if not mconf.lora_rank:
        return {}
    return {"lora_base": {"init_from": str(absolute(cfg.init_from)) if cfg.init_from else None, "seed": cfg.seed,
                          "dtype": cfg.lora.base_dtype}}


def initial_params(cfg: RunConfig, mconf: MixtralConfig, shardings):
    """The starting policy (and so the reference), created or restored directly onto its shardings."""
    if cfg.init_from:
        return ckpt.load_params(cfg.init_from, shardings=shardings)[1]
    return jax.jit(lambda k: model.init_params(mconf, k), out_shardings=shardings)(jax.random.key(cfg.seed))


def lora_setup(cfg: RunConfig, mconf: MixtralConfig, mesh):
    """(adapters, frozen base, their shardings). The base comes from `init_from` (or the seed) in
    `lora.base_dtype`; the adapters start with B = 0, so the policy starts exactly at the base."""
    base_sh, adapter_sh = lora.split(shd.param_shardings(mconf, mesh, cfg.mesh))
    base = initial_params(cfg, mconf.replace(lora_rank=0), base_sh)
    base = jax.jit(lambda p: jax.tree.map(lambda x: x.astype(cfg.lora.base_dtype), p), out_shardings=base_sh,
                   donate_argnums=0)(base)
    adapter_shapes = lora.split(model.param_shapes(mconf))[1]
    adapters = jax.jit(lambda k: lora.init_adapters(adapter_shapes, k), out_shardings=adapter_sh)(
        jax.random.fold_in(jax.random.key(cfg.seed), 1))
    n = sum(x.size for x in jax.tree.leaves(adapters))
    log(f"LoRA rank {mconf.lora_rank} (alpha {mconf.lora_alpha}) on {list(mconf.lora_targets)}: "
        f"{n / 1e6:.3f}M trained parameters; frozen base in {cfg.lora.base_dtype} (also the reference)")
    return adapters, base, adapter_sh, base_sh


def with_ref(pairs, buckets, ref_table: np.ndarray | None, length: int) -> dict[str, np.ndarray]:
    """Collated pairs at `length`, with their precomputed reference logps when there is a table (pairs carry
    their dataset `index`)."""
    batch = data_lib.collate(pairs, buckets, length)
    if ref_table is not None:
        idx = np.array([p["index"] for p in pairs], np.int64)
        batch["ref_logps"] = np.concatenate([ref_table[idx, 0], ref_table[idx, 1]]).astype(np.float32)
    return batch


def place_packed(pairs, ref_table, micro: int, mesh, cfg: RunConfig, buckets) -> dict:
    """A step's pairs packed (`jsmaug.data.packing`) and placed: each process lays out the rows of the data shards
    its devices hold; the per-pair arrays (dataset index, precomputed reference) are small and whole everywhere."""
    shards = shd.batch_rows_divisor(mesh, cfg.mesh)
    layout = packing.plan(pairs, micro=micro, shards=shards, buckets=buckets, row_length=cfg.data.packing_length)
    mine = shd.pairs_by_host(mesh, cfg.mesh, shards)[jax.process_index()]
    r = layout.rows_per_group
    placed = shd.place_rows(packing.materialize(pairs, layout, mine), [d * r + i for d in mine for i in range(r)],
                            shards * r, mesh, cfg.mesh)
    index = np.array([p["index"] for p in pairs], np.int32)
    per_pair = {"pair_index": np.stack([index, index])}
    if ref_table is not None:
        per_pair["ref_logps"] = np.stack([ref_table[index, 0], ref_table[index, 1]]).astype(np.float32)
    return placed | shd.place_rows(per_pair, list(range(len(pairs))), len(pairs), mesh, cfg.mesh)


@dataclasses.dataclass
class Setup:
    """What the training loop and the final phase need."""
    mconf: MixtralConfig
    mesh: Any
    state: step_lib.TrainState
    state_sh: step_lib.TrainState
    ref_params: Any  # the frozen reference (or, with LoRA, the frozen base); None when nothing needs it
    ref_sh: Any
    optimizer: Any
    schedule: Callable
    manager: ckpt.Manager
    start: int  # the step the loop starts from (the restored checkpoint's)
    place: Callable  # place(pairs, ref_table=None, micro=1): a global batch of pairs on the mesh (packed or padded)
    train_ref: np.ndarray | None = None  # precomputed reference logps (N, 2)
    eval_ref: np.ndarray | None = None


def build(cfg: RunConfig, run_data, outputs) -> Setup:
    """Mesh, model, reference, optimizer and state (restored when the workdir holds checkpoints)."""
    from jsmaug.train import reference_cache

    mconf = model_config(cfg)
    check_resume(outputs.checkpoints, outputs.workdir, mconf)
    mesh = shd.make_mesh(cfg.mesh, mconf)
    divisor = shd.batch_rows_divisor(mesh, cfg.mesh)
    if cfg.train.batch_size % divisor or (cfg.train.batch_size // cfg.train.micro_batches) % divisor:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} (per micro-batch "
                          f"{cfg.train.batch_size // cfg.train.micro_batches}) must be divisible by the "
                          f"data-parallel mesh size {divisor} (data x fsdp x expert)")
    outputs.check_writable()
    attn, why = attention.resolve_impl(mconf.attention_impl, mconf.dtype, mconf.resolved_head_dim)
    dispatch = expert_parallel.resolve_dispatch(mconf.moe_dispatch, mesh, mconf.moe_impl)
    local_impl = expert_parallel.resolve_local_impl(mconf.moe_impl, mconf.moe_dispatch, mesh)
    log(f"model: {mconf.num_params() / 1e6:.2f}M parameters, {mconf.num_hidden_layers} layers, "
        f"{mconf.num_local_experts} experts (top-{mconf.num_experts_per_tok}), moe_impl={mconf.moe_impl} -> "
        f"{local_impl}, moe_dispatch={mconf.moe_dispatch} -> {dispatch}, attention_impl={mconf.attention_impl} "
        f"-> {attn} ({why}); mesh {dict(mesh.shape)}")
    if mconf.lora_rank:  # trained: the adapters; the frozen base is the policy's base AND the reference
        params, ref_params, param_sh, ref_sh = lora_setup(cfg, mconf, mesh)
    else:
        param_sh = ref_sh = shd.param_shardings(mconf, mesh, cfg.mesh)
        params = initial_params(cfg, mconf, param_sh)
        # A real copy (jit outputs are fresh buffers): the policy's buffers are donated, the reference's persist.
        ref_params = jax.jit(lambda p: jax.tree.map(lambda x: x.astype(cfg.reference.dtype), p),
                             out_shardings=param_sh)(params)
    optimizer, schedule = step_lib.make_optimizer(cfg.train)
    state_sh = step_lib.state_shardings(optimizer, params, param_sh, mesh)
    buckets = run_data.buckets

    def place(pairs, ref_table=None, micro: int = 1):
        if cfg.data.packing:
            return place_packed(pairs, ref_table, micro, mesh, cfg, buckets)
        length = data_lib.batch_length(pairs, buckets)
        return shd.put_pairs(pairs, functools.partial(with_ref, buckets=buckets, ref_table=ref_table, length=length),
                             mesh, cfg.mesh)

    train_ref = eval_ref = None
    objective = loss_config.objective(cfg.loss)
    log(f"loss: {loss_config.describe(objective)}")
    needs_ref = objective.needs_reference
    if cfg.reference.mode == "precomputed" and needs_ref:
        fp = run_data.tok.fingerprint()
        train_ref = reference_cache.precompute(cfg, mconf, ref_params, run_data.train, place, outputs, fp)
        if run_data.eval:
            eval_ref = reference_cache.precompute(cfg, mconf, ref_params, run_data.eval, place, outputs, fp)
        if not mconf.lora_rank:
            ref_params = None  # training never runs the reference again (with LoRA it is the policy's base)
    elif not needs_ref and not mconf.lora_rank:
        ref_params = None

    state = step_lib.init_state(optimizer, params, state_sh, cfg.seed)
    manager = ckpt.Manager(outputs.checkpoints, keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save)
    start = 0
    moving_ref = ref_params if cfg.reference.sync_every else None  # TR-DPO: the reference is saved and restored
    # Onto this run's shardings, whatever mesh saved it.
    restored = manager.restore_newest_intact(state, log, abstract_reference=moving_ref)
    if restored is not None:
        state = restored[0]
        start = int(state.step)
        if moving_ref is not None:
            ref_params = jax.device_put(restored[3], ref_sh)
        log(f"resumed from {outputs.checkpoints} at step {start} (skipped so far: {int(state.skipped)})")
    return Setup(mconf=mconf, mesh=mesh, state=state, state_sh=state_sh, ref_params=ref_params,
                 ref_sh=None if ref_params is None else ref_sh, optimizer=optimizer, schedule=schedule, manager=manager, start=start,
                 place=place, train_ref=train_ref, eval_ref=eval_ref)
