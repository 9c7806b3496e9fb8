"""The jitted DPOP/DPO/SFT train step: one policy forward over [chosen; rejected], frozen reference, optax.

    loss = mean_b preference_loss(b) + router_aux_loss_coef * aux_loss(policy)

The preference loss is the `loss` section's objective (`loss_config`): one loss of `jsmaug.losses` or a weighted
sum of several, or a function of your own.

The reference enters only through `jax.lax.stop_gradient` (inside `reference_logps` and again inside each loss),
runs without the aux loss, and is never part of the optimizer state. With `reference.mode=precomputed` the
batch carries the reference logps and no reference forward runs at all.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jsmaug import losses

from jsmaug.data import packing

from jsmaug.losses import config as loss_config

from jsmaug.models import logps as logps_lib, lora, decoder as model

from jsmaug.parallel import mesh_context
from jsmaug.models.config import ConfigError, ModelConfig


class TrainState(NamedTuple):
    params: Any
    opt_state: Any
    step: jax.Array  # int32 scalar: optimizer steps taken (applied or skipped)
    skipped: jax.Array  # int32 scalar: steps whose loss or gradients were not finite
    rng: jax.Array  # uint32 key data (reserved for router jitter / dropout)


def warmup_steps(train) -> int:
    """`train.warmup_steps`, or `ceil(warmup_ratio x steps)` as transformers' `TrainingArguments.get_warmup_steps`
    counts a ratio."""
    return math.ceil(train.warmup_ratio * train.steps) if train.warmup_ratio else train.warmup_steps


def learning_rate_schedule(train) -> optax.Schedule:
    """The rate of update `count` (0-based), as transformers' `get_scheduler(name, ...)` gives it to the same
    update: a linear warm-up from 0 (update 0 has rate 0, as in transformers), then the named decay over
    `steps - warm-up` updates, ending at `end_lr_fraction x peak` (transformers: 0; its `cosine_with_min_lr` takes
    that fraction as `min_lr_rate`). `constant` has no warm-up (config.validate refuses one)."""
    peak, warm, total = train.learning_rate, warmup_steps(train), train.steps
    decay_steps = max(total - warm, 1)
    if train.schedule in ("cosine", "cosine_with_min_lr"):
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=train.end_lr_fraction)
    elif train.schedule == "linear":
        decay = optax.linear_schedule(peak, peak * train.end_lr_fraction, decay_steps)
    else:  # constant, constant_with_warmup
        decay = optax.constant_schedule(peak)
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warm), decay], [warm]) if warm else decay


def param_names(params) -> list[str]:
    """Each leaf's path, `/`-joined (`layers/layer/self_attn/q_proj_bias`, `norm/weight`), in leaf order."""
    return [jax.tree_util.keystr(path, simple=True, separator="/")
            for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


DEFAULT_NO_DECAY = ("bias", "norm")  # absent from some families (llama has no biases), so never an error


def decay_mask(exclude: tuple[str, ...]):
    """optax's `mask` for weight decay: True (decayed) for every leaf whose path contains none of `exclude`.

    The default ("bias", "norm") is HF's Trainer rule (`Trainer.get_decay_parameter_names`: names holding "bias",
    "layernorm", "rmsnorm", "norm", "_norm" are not decayed): every family's q/k/v/o biases and its
    input/post-attention/final norms and q/k norms are left out; embeddings, lm_head, projections, experts
    and routers are decayed. LoRA adapters (`<weight>_lora_a/_b`) are decayed, as PEFT's `lora_A/lora_B` are
    under HF's rule. A name the user added that matches no parameter is an error (a typo would silently decay)."""
    exclude = tuple(exclude)

    def mask(params):
        names = param_names(params)
        base, _ = lora.split(params)
        if base:  # a LoRA tree (adapters only) has neither embeddings nor norms to match: nothing to check there
            for word in exclude:
                if word not in DEFAULT_NO_DECAY and not any(word in n for n in names):
                    raise ConfigError(f"train.weight_decay_exclude: {word!r} is in no parameter's name; they are "
                                      f"{sorted(set(names))}")
        flags = [not any(word in n for word in exclude) for n in names]
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params), flags)
    return mask


def masked_decayed_weights(weight_decay: float, mask) -> optax.GradientTransformation:
    """optax's `add_decayed_weights(weight_decay, mask)` with the unmasked one's state (`EmptyState`): optax's
    masked version wraps its state in a `MaskedState`, a tree checkpoints written before the mask existed do not
    restore into. The mask is computed (and checked) at init too, so a bad name fails before the first step;
    not when `optax.tree_map_params` calls init with its placeholder instead of a params tree."""
    def init(params):
        if isinstance(params, dict):
            mask(params)
        return optax.EmptyState()

    def update(updates, state, params=None):
        flags = mask(params)
        return jax.tree.map(lambda u, w, decayed: u + weight_decay * w if decayed else u, updates, params,
                            flags), state
    return optax.GradientTransformation(init, update)


def make_optimizer(train) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(optimizer, schedule): global-norm clipping (off at 0), then AdamW (torch.optim.AdamW's decoupled decay,
    lr x weight_decay x w) on the weights `decay_mask` lets through, at `learning_rate_schedule`'s rate. The same
    chain as `optax.adamw(schedule, ..., mask=...)`, state for state as it was without the mask."""
    schedule = learning_rate_schedule(train)
    parts = [optax.clip_by_global_norm(train.grad_clip)] if train.grad_clip > 0 else []
    parts.append(optax.chain(optax.scale_by_adam(b1=train.b1, b2=train.b2, eps=train.eps),
                             masked_decayed_weights(train.weight_decay, decay_mask(train.weight_decay_exclude)),
                             optax.scale_by_learning_rate(schedule)))
    return optax.chain(*parts), schedule


def policy_logps(config: ModelConfig, params, batch, chunk_size: int = 0, token_weights=None,
                 with_aligned: bool = False):
    """Completion log-probs of every sequence (`logps.SequenceLogps`: one per row, or per packed sequence), plus
    the aux loss and MoE stats."""
    h, aux, stats = model.forward_hidden(config, params, batch["input_ids"], segment_ids=batch["segment_ids"],
                                         positions=batch["positions"])
    w, table_vd = model.unembed_operand(config, params)
    seq = logps_lib.sequence_logps_from_hidden(
        h, w, batch["labels"], batch["loss_mask"], chunk_size=chunk_size or None, token_weights_BxS=token_weights,
        with_aligned=with_aligned, table_vd=table_vd, row_groups=mesh_context.batch_shards(),
        **_packing_args(batch))
    return seq, aux, stats


def _packing_args(batch) -> dict:
    if "sequence_ids" not in batch:
        return {}
    return {"sequence_ids_BxS": batch["sequence_ids"], "num_sequences": batch["pair_index"].shape[0]}


def token_weights(batch, ld_alpha: float | None):
    """LD-DPO's per-token weights of a [chosen; rejected] batch (padded or packed), or None."""
    if ld_alpha is None:
        return None
    packed = _packing_args(batch)
    return logps_lib.ld_weights(batch["loss_mask"], ld_alpha, packed.get("sequence_ids_BxS"),
                                packed.get("num_sequences"))


def reference_logps(config: ModelConfig, ref_params, batch, chunk_size: int = 0, ld_alpha: float | None = None):
    """The frozen reference: stop_gradient on its weights, no aux loss. With LoRA it is the base alone."""
    batch = unpair(batch)
    config = config.replace(lora_rank=0) if config.lora_rank else config
    seq, _, _ = policy_logps(config, jax.lax.stop_gradient(ref_params), batch, chunk_size,
                             token_weights(batch, ld_alpha))
    return jax.lax.stop_gradient(seq.logps)


def _split(x):
    half = x.shape[0] // 2
    return x[:half], x[half:]


def unpair(batch):
    """(2, B, ...) paired arrays (see `sharding.put_pairs`) -> [chosen; rejected] rows (2B, ...). A packed batch
    (`jsmaug.data.packing`) of one micro-batch: its rows (1, R, L) -> (R, L), its per-pair arrays (2, B) -> (2B,)."""
    if batch["input_ids"].ndim == 3:
        return jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), batch)
    return batch


def _packed_micro_batches(batch, k: int):
    """A packed batch of k micro-batches -> k packed batches stacked on axis 0: the rows are laid out per
    micro-batch already; each per-pair array (2, B) becomes (k, 2B/k), [chosen; rejected] per micro-batch."""
    def split(name, x):
        if name in packing.ROW_KEYS:
            return x
        return jnp.swapaxes(x.reshape(2, k, x.shape[1] // k, *x.shape[2:]), 0, 1).reshape(k, -1, *x.shape[2:])
    return {name: split(name, x) for name, x in batch.items()}


def pair_losses(params, ref_params, batch, *, config: ModelConfig, loss_cfg, chunk_size: int = 0):
    """Per-pair loss inputs and losses: (LossInputs, per-pair loss (B,), each term's mean, aux loss, MoE stats).

    With LoRA (`config.lora_rank > 0`), `params` are the adapters and `ref_params` the frozen base: the policy is
    base + adapters (the base under stop_gradient: it gets no gradient), and the reference is the base alone.
    A reference-free loss sees zeros as reference log-probs (its rewards are then beta x policy log-probs, as
    TRL's CPO and ORPO trainers log them)."""
    objective = loss_config.objective(loss_cfg)
    batch = unpair(batch)
    if config.lora_rank:
        params = lora.combine(jax.lax.stop_gradient(ref_params), params)
    weights = token_weights(batch, objective.ld_alpha)
    seq, aux, stats = policy_logps(config, params, batch, chunk_size, weights, objective.wpo)
    pc, pr = _split(seq.logps)
    if "ref_logps" in batch:  # precomputed reference: no reference forward
        rc, rr = _split(jax.lax.stop_gradient(batch["ref_logps"]))
    elif objective.needs_reference:
        rc, rr = _split(reference_logps(config, ref_params, batch, chunk_size, objective.ld_alpha))
    else:
        rc, rr = jnp.zeros_like(pc), jnp.zeros_like(pr)
    aligned = (None, None) if seq.aligned_logps is None else _split(seq.aligned_logps)
    inputs = losses.LossInputs(pc, pr, rc, rr, *_split(seq.num_tokens), *_split(seq.logps_unweighted), *aligned)
    per_pair, terms = objective(inputs)
    return inputs, per_pair, terms, aux, stats


def loss_and_metrics(params, ref_params, batch, *, config: ModelConfig, loss_cfg, chunk_size: int = 0):
    batch = unpair(batch)
    inputs, per_pair, terms, aux, stats = pair_losses(params, ref_params, batch, config=config, loss_cfg=loss_cfg,
                                                      chunk_size=chunk_size)
    pref_loss = jnp.mean(per_pair)
    loss = pref_loss + config.router_aux_loss_coef * aux
    metrics = losses.preference_metrics(*inputs[:4], beta=loss_cfg.beta)
    counts = jnp.sum(stats["counts"], axis=0)
    metrics.update({
        "loss": loss, "loss/preference": pref_loss, "moe/aux_loss": aux,
        "moe/expert_load": counts / jnp.maximum(jnp.sum(counts), 1.0),
        "moe/dropped": jnp.sum(stats["dropped"]),
        "tokens": jnp.sum((batch["segment_ids"] > 0).astype(jnp.int32)),
        "padding_fraction": 1.0 - jnp.mean((batch["segment_ids"] > 0).astype(jnp.float32)),
    })
    if len(terms) > 1:  # each term of a weighted combination, unweighted, as its own metric
        metrics.update({f"loss/{name}": value for name, value in terms.items()})
    return loss, metrics


def _micro_batches(batch, k: int):
    """Splits [chosen; rejected] rows into k micro-batches that each keep their pairs together."""
    def split(x):
        c, r = _split(x)
        c = c.reshape(k, c.shape[0] // k, *c.shape[1:])
        r = r.reshape(k, r.shape[0] // k, *r.shape[1:])
        return jnp.concatenate([c, r], axis=1)
    return jax.tree.map(split, batch)


def train_step(state: TrainState, batch, ref_params, inject_nan: bool | jax.Array = False, *,
               config: ModelConfig, loss_cfg, optimizer, micro_batches: int = 1, chunk_size: int = 0):
    """One optimizer step. A step whose loss or gradient norm is not finite is not applied (and counted)."""
    grad_fn = jax.value_and_grad(
        functools.partial(loss_and_metrics, config=config, loss_cfg=loss_cfg, chunk_size=chunk_size), has_aux=True)
    if micro_batches == 1:
        (loss, metrics), grads = grad_fn(state.params, ref_params, unpair(batch))
    else:
        mb = (_packed_micro_batches(batch, micro_batches) if "sequence_ids" in batch
              else _micro_batches(unpair(batch), micro_batches))

        def body(acc, one):
            (l, m), g = grad_fn(state.params, ref_params, one)
            return jax.tree.map(jnp.add, acc, (g, l, m)), None

        zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(lambda: grad_fn(
            state.params, ref_params, jax.tree.map(lambda x: x[0], mb))))
        zero_acc = (zeros[1], zeros[0][0], zeros[0][1])
        (grads, loss, metrics), _ = jax.lax.scan(body, zero_acc, mb)
        grads, loss = jax.tree.map(lambda g: g / micro_batches, grads), loss / micro_batches
        tokens = metrics["tokens"]
        metrics = jax.tree.map(lambda m: m / micro_batches, metrics)
        metrics["tokens"] = tokens
    grads = jax.tree.map(lambda g: jnp.where(inject_nan, jnp.nan, g), grads)
    grad_norm = optax.global_norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, new_opt = optimizer.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
    new_state = TrainState(params=keep(new_params, state.params), opt_state=keep(new_opt, state.opt_state),
                           step=state.step + 1, skipped=state.skipped + (~ok).astype(jnp.int32), rng=state.rng)
    metrics.update({"grad_norm": grad_norm, "applied": ok.astype(jnp.int32)})
    return new_state, metrics


PAIR_LOGPS = ("policy_chosen", "policy_rejected", "reference_chosen", "reference_rejected")  # eval_step's keys


def eval_step(params, ref_params, batch, *, config: ModelConfig, loss_cfg, chunk_size: int = 0):
    """Per-pair values (not batch means, so a caller can drop padding pairs): the four logps, the preference
    loss of each pair, and the batch's aux loss. (A batch-level loss, `aot` or `sft`, is per eval batch.)"""
    inputs, per_pair, _, aux, _ = pair_losses(params, ref_params, batch, config=config, loss_cfg=loss_cfg,
                                              chunk_size=chunk_size)
    return {"policy_chosen": inputs.policy_chosen_logps, "policy_rejected": inputs.policy_rejected_logps,
            "reference_chosen": inputs.reference_chosen_logps, "reference_rejected": inputs.reference_rejected_logps,
            "loss": per_pair, "aux": aux}


def eval_metrics(per_pair, aux_mean: float, *, config: ModelConfig, loss_cfg) -> dict[str, float]:
    """Metrics (the trainer's names) from `eval_step` outputs concatenated over the real pairs of a split."""
    m = losses.preference_metrics(*(jnp.asarray(per_pair[k]) for k in PAIR_LOGPS), beta=loss_cfg.beta)
    pref = float(np.mean(per_pair["loss"]))
    m.update({"loss/preference": pref, "loss": pref + config.router_aux_loss_coef * aux_mean,
              "moe/aux_loss": aux_mean})
    return {k: float(v) for k, v in m.items()}


# ------------------------------------------------------------------------------------------------ on a mesh

def state_shardings(optimizer, params, param_sh, mesh) -> TrainState:
    """Where every piece of the train state lives: moments beside their params, scalars replicated."""
    from jax.sharding import NamedSharding, PartitionSpec

    from jsmaug.parallel import sharding as shd

    replicated = NamedSharding(mesh, PartitionSpec())
    opt_sh = shd.opt_state_shardings(optimizer, jax.eval_shape(lambda: params), param_sh, mesh)
    return TrainState(params=param_sh, opt_state=opt_sh, step=replicated, skipped=replicated, rng=replicated)


def init_state(optimizer, params, state_sh: TrainState, seed: int) -> TrainState:
    """A fresh train state placed on `state_sh` (the optimizer state is created directly sharded)."""
    rep = state_sh.step
    return TrainState(params=params, opt_state=jax.jit(optimizer.init, out_shardings=state_sh.opt_state)(params),
                      step=jax.device_put(jnp.int32(0), rep), skipped=jax.device_put(jnp.int32(0), rep),
                      rng=jax.device_put(jax.random.key_data(jax.random.key(seed)), rep))


def jit_train_step(state_sh: TrainState, batch_sh, ref_sh, *, config: ModelConfig, loss_cfg, optimizer,
                   micro_batches: int = 1, chunk_size: int = 0):
    """`train_step` jitted with explicit in/out shardings; the state is donated. It is traced inside
    `mesh_context.mesh_scope` (the mesh of the shardings), so the MoE layers can move tokens."""
    rep = state_sh.step
    fn = jax.jit(functools.partial(train_step, config=config, loss_cfg=loss_cfg, optimizer=optimizer,
                                   micro_batches=micro_batches, chunk_size=chunk_size),
                 in_shardings=(state_sh, batch_sh, ref_sh, rep), out_shardings=(state_sh, rep), donate_argnums=0)
    return on_mesh(fn, batch_sh)


def on_mesh(fn, batch_sh):
    """`fn` traced inside `mesh_context.mesh_scope`, with the mesh and the token axes of `batch_sh` (the
    paired batch's shardings: axis 1 holds the pairs)."""
    sharding = next(iter(jax.tree.leaves(batch_sh)))
    pair_axes = sharding.spec[1] if len(sharding.spec) > 1 else None
    axes = () if pair_axes is None else (pair_axes,) if isinstance(pair_axes, str) else tuple(pair_axes)
    return mesh_context.under_mesh(fn, sharding.mesh, axes)
