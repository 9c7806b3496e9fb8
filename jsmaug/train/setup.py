"""A training run's second phase: the mesh, the model, the reference, the optimizer and the restored state.

Every check that can refuse the run (another model in the workdir, a batch the mesh cannot split, an unwritable
workdir) comes before anything is written. The reference is the starting policy, frozen: a copy that is never
given to the optimizer (with LoRA, the frozen base itself). On resume it is rebuilt from `init_from` (or from
the seed for a random init), so it is not stored twice.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import numpy as np
from etils import epath

from jsmaug.models import families
from jsmaug.losses import config as loss_config
from jsmaug.models import decoder as model, lora, quant
from jsmaug.models.config import ConfigError, ModelConfig
from jsmaug.paths import absolute
from jsmaug.train import checkpoint as ckpt, plan as plan_lib, programs, quantized_base, step as step_lib
from jsmaug.train.config import RunConfig
from jsmaug.train.metrics_log import log



def model_config(cfg: RunConfig) -> ModelConfig:
    """The model config: `init_from`'s architecture (with this run's numerics settings), or `model`; with the
    `lora` section's adapters."""
    if not cfg.init_from:
        return plan_lib.model_config(cfg)
    if not epath.Path(cfg.init_from).exists():
        raise ConfigError(f"init_from: {cfg.init_from}: no such file or folder")
    stored = ckpt.read_model_config(cfg.init_from)
    if families.to_hf_dict(stored) != families.to_hf_dict(cfg.model.replace(param_dtype=stored.param_dtype)):
        log(f"note: init_from {cfg.init_from} carries its own architecture; using it instead of `model`")
    return plan_lib.model_config(cfg, stored)


def check_resume(checkpoints: epath.Path, workdir, config: ModelConfig) -> None:
    """Refuses, before anything is written, to resume a workdir whose checkpoints hold another model."""
    found = ckpt.stored_model_config(checkpoints)
    if found is None:
        return
    step, stored = found
    stored = ModelConfig.from_dict(stored).to_dict()  # JSON lists back to tuples, defaults for newer fields
    want = config.to_dict()
    diff = [f"model.{k}: stored {stored.get(k)!r}, requested {want[k]!r}" for k in sorted(want)
            if k not in plan_lib.RESUMABLE_MODEL_CHANGES and stored.get(k) != want[k]]
    if diff:
        raise ConfigError(f"{workdir} holds checkpoints of another model (step {step}); " + "; ".join(diff)
                          + ". Use another workdir, or the stored values to resume")


def lora_meta(cfg: RunConfig, config: ModelConfig) -> dict:
    """What a LoRA checkpoint says about its base: where the base came from (it is not stored again)."""
    if not config.lora_rank:
        return {}
    return {"lora_base": {"init_from": str(absolute(cfg.init_from)) if cfg.init_from else None, "seed": cfg.seed,
                          "dtype": cfg.lora.base_dtype, "quant": cfg.lora.base_quant,
                          "quant_group": cfg.lora.base_quant_group,
                          # QLoRA quantizes embed_tokens / lm_head too (lora.quantize_base); a checkpoint without
                          # this key was trained on unquantized tables
                          "quant_embeddings": cfg.lora.base_quant != "none"}}


def initial_params(cfg: RunConfig, config: ModelConfig, shardings):
    """The starting policy (and so the reference), created or restored directly onto its shardings. A converter
    checkpoint quantized by `jsmaug convert --quantize` is refused here (`ckpt.load_params`): it is a QLoRA base,
    which `lora_setup` restores itself."""
    if cfg.init_from:
        return ckpt.load_params(cfg.init_from, shardings=shardings)[1]
    return jax.jit(lambda k: model.init_params(config, k), out_shardings=shardings)(jax.random.key(cfg.seed))


def _quantized_init_base(init_from, fmt: str, group: int, base_dtype: str, base_sh):
    """A QLoRA run's frozen base from `init_from` when that is a quantized converter checkpoint, else None.

    Checks the record against the run's `lora.base_quant` / `lora.base_quant_group` first (a `ConfigError` naming
    the checkpoint and both values, before anything is compiled or written), then restores the packed values and
    scales straight onto the plan's base shardings `base_sh` (no float copy of the base, no quantization); only the
    leaves kept in float (norms, routers, biases) are cast to `base_dtype`."""
    if not init_from or not (epath.Path(init_from) / "model_config.json").exists():
        return None
    rec = quantized_base.read_record(init_from)
    if rec is None:
        return None
    quantized_base.check_run(init_from, rec, fmt, group)
    if rec["quantized_from"] != base_dtype:
        log(f"note: init_from {init_from} was quantized from {rec['quantized_from']} values; lora.base_quant "
            f"quantizing in place would have started from {base_dtype} ones (convert with --dtype {base_dtype} "
            "for the same bits)")
    base = ckpt.load_params(init_from, shardings=base_sh, quantized=True)[1]
    cast = jax.jit(lambda p: jax.tree.map(lambda x: x if quant.is_quantized(x) else x.astype(base_dtype), p,
                                          is_leaf=quant.is_quantized), out_shardings=base_sh, donate_argnums=0)
    return cast(base)


def lora_setup(cfg: RunConfig, plan: plan_lib.RunPlan):
    """(adapters, frozen base). The base comes from `init_from` (or the seed) in `lora.base_dtype`, its
    projections then quantized when `lora.base_quant` says so (QLoRA); the adapters start with B = 0, so the
    policy starts exactly at the base. An `init_from` quantized by `jsmaug convert --quantize` is checked against
    `lora.base_quant` / `lora.base_quant_group` first (one error naming both, before anything is compiled) and
    restored packed onto the base's shardings: no float copy, no quantization."""
    config, base_sh, adapter_sh = plan.config, plan.ref_sh, plan.param_sh
    fmt = cfg.lora.base_quant
    base = _quantized_init_base(cfg.init_from, fmt, cfg.lora.base_quant_group, cfg.lora.base_dtype, base_sh)
    if base is None:
        # Unquantized, a quantized weight is built on its packed values' sharding (the weight's, or less sharded).
        full_sh = jax.tree.map(lambda s: s.packed if quant.is_quantized(s) else s, base_sh,
                               is_leaf=quant.is_quantized)
        base = initial_params(cfg, config.replace(lora_rank=0), full_sh)

        def prepare(p):
            p = jax.tree.map(lambda x: x.astype(cfg.lora.base_dtype), p)
            return p if fmt == "none" else lora.quantize_base(p, fmt, cfg.lora.base_quant_group)

        base = jax.jit(prepare, out_shardings=base_sh, donate_argnums=0)(base)
    adapter_shapes = lora.split(model.param_shapes(config))[1]
    adapters = jax.jit(lambda k: lora.init_adapters(adapter_shapes, k), out_shardings=adapter_sh)(
        jax.random.fold_in(jax.random.key(cfg.seed), 1))
    n = sum(x.size for x in jax.tree.leaves(adapters))
    log(f"LoRA rank {config.lora_rank} (alpha {config.lora_alpha}) on {list(config.lora_targets)}: "
        f"{n / 1e6:.3f}M trained parameters; frozen base in {cfg.lora.base_dtype}"
        + (f", projections and embeddings in {fmt} (group {cfg.lora.base_quant_group})" if fmt != "none" else "")
        + f", {sum(x.nbytes for x in jax.tree.leaves(base)) / 1e6:.1f} MB (also the reference)")
    return adapters, base


@dataclasses.dataclass
class Setup:
    """What the training loop and the final phase need: the plan and the real state it describes."""
    plan: plan_lib.RunPlan
    state: step_lib.TrainState
    ref_params: Any  # the frozen reference (or, with LoRA, the frozen base); None when nothing needs it
    manager: ckpt.Manager
    start: int  # the step the loop starts from (the restored checkpoint's)
    place: Callable  # place(pairs, ref_table=None, micro=1): a global batch of pairs on the mesh (packed or padded)
    train_ref: np.ndarray | None = None  # precomputed reference logps (N, 2)
    eval_ref: np.ndarray | None = None
    run_length: Any = None  # the run's packing.RunLayout (None: data.packing_length); padded runs ignore it
    # Seconds (wall and this process's CPU) compiling the step ahead of the first step and in the loop: the
    # run's result reports them, so a loaded machine's wall time can be read against the work done.
    timings: dict = dataclasses.field(default_factory=dict)

    config = property(lambda self: self.plan.config)  # the model config
    mconf = property(lambda self: self.plan.config, doc="The former name of `config` (kept for users' code).")
    mesh = property(lambda self: self.plan.mesh)
    state_sh = property(lambda self: self.plan.state_sh)
    optimizer = property(lambda self: self.plan.optimizer)
    schedule = property(lambda self: self.plan.schedule)

    @property
    def ref_sh(self):
        return None if self.ref_params is None else self.plan.ref_sh


def build(cfg: RunConfig, run_data, outputs) -> Setup:
    """The plan, then its real params, reference, optimizer state (restored when the workdir holds checkpoints)."""
    config = model_config(cfg)
    check_resume(outputs.checkpoints, outputs.workdir, config)
    if run_data.tok.vocab_size > config.vocab_size:  # ids past the embedding would be read as other tokens
        raise ConfigError(f"tokenizer {run_data.tok.path}: {run_data.tok.vocab_size} tokens, more than the model's "
                          f"vocab_size {config.vocab_size}; set data.tokenizer_path to the model's own tokenizer")
    plan = plan_lib.plan(cfg, config=config)
    outputs.check_writable()
    log(plan.describe())
    return materialize(cfg, plan, run_data, outputs)


def materialize(cfg: RunConfig, plan: plan_lib.RunPlan, run_data, outputs) -> Setup:
    """The plan's real params and reference, the precomputed reference log-probs, and the restored state."""
    from jsmaug.train import reference_cache

    config = plan.config
    if config.lora_rank:  # trained: the adapters; the frozen base is the policy's base AND the reference
        params, ref_params = lora_setup(cfg, plan)
    else:
        params = initial_params(cfg, config, plan.param_sh)
        # A real copy (jit outputs are fresh buffers): the policy's buffers are donated, the reference's persist.
        ref_params = jax.jit(lambda p: jax.tree.map(lambda x: x.astype(cfg.reference.dtype), p),
                             out_shardings=plan.ref_sh)(params) if plan.reference or plan.precomputed else None
    # Packed: one row length and a few row counts for the whole run, from its first steps' lengths (a padded run
    # keeps the layout packing would take, for its padding line; its batches are padded all the same).
    run_length = programs.packed_layout(cfg, plan, run_data.train, run_data.buckets,
                                        log if cfg.data.packing else None)

    def place_batch(pairs, ref_table=None, micro: int = 1):
        return plan.place(pairs, run_data.buckets, ref_table, micro, run_length)

    train_ref = eval_ref = None
    log(f"loss: {loss_config.describe(plan.objective)}")
    if plan.precomputed:
        fp = run_data.tok.fingerprint()
        train_ref = reference_cache.precompute(cfg, config, ref_params, run_data.train, place_batch, outputs, fp)
        if run_data.eval:
            eval_ref = reference_cache.precompute(cfg, config, ref_params, run_data.eval, place_batch, outputs, fp)
    if plan.reference is None:
        ref_params = None  # the step takes no reference weights (precomputed, or a reference-free loss)

    state = step_lib.init_state(plan.optimizer, params, plan.state_sh, cfg.seed)
    manager = ckpt.Manager(outputs.checkpoints, keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save)
    start = 0
    moving_ref = ref_params if cfg.reference.sync_every else None  # TR-DPO: the reference is saved and restored
    # Onto this run's shardings, whatever mesh saved it.
    restored = manager.restore_newest_intact(state, log, abstract_reference=moving_ref)
    if restored is not None:
        state = restored[0]
        start = int(state.step)
        if moving_ref is not None:
            ref_params = jax.device_put(restored[3], plan.ref_sh)
        log(f"resumed from {outputs.checkpoints} at step {start} (skipped so far: {int(state.skipped)})")
    return Setup(plan=plan, state=state, ref_params=ref_params, manager=manager, start=start, place=place_batch,
                 train_ref=train_ref, eval_ref=eval_ref, run_length=run_length)
