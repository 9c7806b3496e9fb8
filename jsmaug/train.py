"""DPOP training end to end: `python -m jsmaug.train CONFIG.yaml [key=value ...]`.

files -> tokenised pairs -> Grain batches -> jitted step -> metrics (terminal, metrics.jsonl, TensorBoard)
and Orbax checkpoints (async, keep K) -> HF export of the final policy in workdir/hf.

Resume: a run started with a workdir that holds checkpoints restores the latest complete one (params,
optimizer state, step, RNG, skipped count; the data position is the step, since batch i is a pure function of
(data, seed, i)) and continues exactly where it stopped. The reference is rebuilt from `init_from` (or from
the seed for a random init), so it is not stored twice.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jsmaug import checkpoint as ckpt
from jsmaug import data as data_lib
from jsmaug import attention, expert_parallel, lora, model, sharding as shd, step as step_lib
from jsmaug.metrics_log import MetricsWriter, log, plot_metrics
from jsmaug.config import ConfigError, MixtralConfig
from jsmaug.run_config import RunConfig, load_run_config


# ------------------------------------------------------------------------------------------------ setup

def model_config(cfg: RunConfig):
    """The model config: `init_from`'s architecture (with this run's numerics settings), or `model`; with the
    `lora` section's adapters."""
    lora_fields = dict(lora_rank=cfg.lora.rank, lora_alpha=cfg.lora.alpha, lora_targets=tuple(cfg.lora.targets))
    if not cfg.init_from:
        return cfg.model.replace(**lora_fields)
    if not Path(cfg.init_from).exists():
        raise ConfigError(f"init_from: {cfg.init_from}: no such file or folder")
    stored = ckpt.read_model_config(cfg.init_from)
    if stored.to_hf_dict() != cfg.model.replace(param_dtype=stored.param_dtype).to_hf_dict():
        log(f"note: init_from {cfg.init_from} carries its own architecture; using it instead of `model`")
    return stored.replace(**{k: getattr(cfg.model, k) for k in _RESUMABLE_MODEL_CHANGES}, **lora_fields)


# Fields a run may change on resume (numerics and dispatch); every other model field must match the checkpoint.
_RESUMABLE_MODEL_CHANGES = ("dtype", "remat", "moe_impl", "moe_block_size", "moe_capacity_factor", "moe_dispatch",
                            "attention_impl", "attention_block_size")


def check_resume(workdir: Path, mconf) -> None:
    """Refuses, before anything is written, to resume a workdir whose checkpoints hold another model."""
    found = ckpt.stored_model_config(workdir / "checkpoints")
    if found is None:
        return
    step, stored = found
    stored = MixtralConfig.from_dict(stored).to_dict()  # JSON lists back to tuples, defaults for newer fields
    want = mconf.to_dict()
    diff = [f"model.{k}: stored {stored.get(k)!r}, requested {want[k]!r}" for k in sorted(want)
            if k not in _RESUMABLE_MODEL_CHANGES and stored.get(k) != want[k]]
    if diff:
        raise ConfigError(f"{workdir} holds checkpoints of another model (step {step}); " + "; ".join(diff)
                          + ". Use another workdir, or the stored values to resume")


def prepare_workdir(workdir: Path) -> None:
    """Creates the workdir, or stops with a clear error if it cannot be written."""
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / ".write_probe"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"workdir: cannot write {workdir}: {err.strerror or err}") from err


def write_config_json(workdir: Path, raw_config: dict | None) -> None:
    """workdir/config.json, written once the run is known to go ahead (after the resume checks), atomically."""
    tmp = workdir / "config.json.tmp"
    tmp.write_text(json.dumps(raw_config or {}, indent=2, default=str))
    os.replace(tmp, workdir / "config.json")


def lora_meta(cfg: RunConfig, mconf) -> dict:
    """What a LoRA checkpoint says about its base: where the base came from (it is not stored again)."""
    if not mconf.lora_rank:
        return {}
    return {"lora_base": {"init_from": str(Path(cfg.init_from).absolute()) if cfg.init_from else None,
                          "seed": cfg.seed, "dtype": cfg.lora.base_dtype}}


def lora_setup(cfg: RunConfig, mconf, mesh):
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


def initial_params(cfg: RunConfig, mconf, shardings):
    """The starting policy (and so the reference), created or restored directly onto its shardings."""
    if cfg.init_from:
        return ckpt.load_params(cfg.init_from, shardings=shardings)[1]
    return jax.jit(lambda k: model.init_params(mconf, k), out_shardings=shardings)(jax.random.key(cfg.seed))


def _tree_fingerprint(tree) -> str:
    h = hashlib.sha256()
    for leaf in jax.tree.leaves(tree):
        a = np.asarray(jax.device_get(leaf))
        h.update(str(a.shape).encode() + str(a.dtype).encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def _examples_fingerprint(examples) -> str:
    h = hashlib.sha256()
    for ex in examples:
        for k in ("prompt", "chosen", "rejected"):
            h.update(ex[k].tobytes() + b"|")
    return h.hexdigest()[:16]


def _fixed_chunks(examples, batch_size):
    """Every example once, in order, in full batches of pairs (the last one padded by repeating its first pair);
    yields (number of real pairs, pairs)."""
    for i in range(0, len(examples), batch_size):
        chunk = list(examples[i:i + batch_size])
        n = len(chunk)
        yield n, chunk + [chunk[0]] * (batch_size - n)


def precompute_reference(cfg: RunConfig, mconf, ref_params, examples, buckets, cache_dir: Path, tok_fp: str,
                         put=lambda b: b):
    """Reference logps of every example (chosen, rejected), cached on disk by a fingerprint of data + weights +
    tokenizer settings. Returns an (N, 2) float32 array."""
    fp = hashlib.sha256(json.dumps([_examples_fingerprint(examples), _tree_fingerprint(ref_params), tok_fp,
                                    cfg.data.max_length, cfg.data.max_prompt_length,
                                    cfg.reference.dtype]).encode()).hexdigest()[:20]
    path = cache_dir / f"ref_logps-{fp}.npy"
    if path.exists():
        log(f"reference logps: cached {path}")
        return np.load(path)
    jitted = jax.jit(functools.partial(step_lib.reference_logps, mconf, chunk_size=cfg.train.logps_chunk_size))
    fn = None
    out = np.zeros((len(examples), 2), np.float32)
    t0 = time.time()
    bs = cfg.train.batch_size
    for i, (n, chunk) in enumerate(_fixed_chunks(examples, bs)):
        batch = put(data_lib.collate(chunk, buckets))
        if fn is None:  # on a mesh, traced where the MoE layers can see it (token dispatch)
            sharding = getattr(batch["input_ids"], "sharding", None)
            fn = step_lib.on_mesh(jitted, sharding) if getattr(sharding, "mesh", None) is not None else jitted
        lp = np.asarray(jax.device_get(fn(ref_params, batch)))
        out[i * bs:i * bs + n, 0] = lp[:n]
        out[i * bs:i * bs + n, 1] = lp[bs:bs + n]
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npy")
    np.save(tmp, out)
    os.replace(tmp, path)
    log(f"reference logps: computed for {len(examples)} pairs in {time.time() - t0:.1f}s -> {path}")
    return out


def _with_index(examples):
    return [dict(ex, index=np.int32(i)) for i, ex in enumerate(examples)]


def _collate_with_ref(pairs, buckets, ref_table):
    batch = data_lib.collate(pairs, buckets)
    if ref_table is not None:
        idx = np.array([p["index"] for p in pairs])
        batch["ref_logps"] = np.concatenate([ref_table[idx, 0], ref_table[idx, 1]]).astype(np.float32)
    return batch


# ------------------------------------------------------------------------------------------------ the run

def run(cfg: RunConfig, raw_config: dict | None = None) -> dict[str, Any]:
    workdir = Path(cfg.workdir)
    if cfg.mesh.distributed:
        jax.distributed.initialize()  # coordinator, process count and id come from the environment
    log(f"jsmaug: workdir {workdir}, backend {jax.default_backend()} x{jax.device_count()} "
        f"(process {jax.process_index()}/{jax.process_count()})")

    # --- data
    tok = data_lib.Tokenizer(cfg.data.tokenizer_path)
    buckets = data_lib.bucket_lengths(cfg.data)
    train_examples, report = data_lib.prepare(cfg.data.train_path, cfg.data, tok)
    log(f"train data {cfg.data.train_path}: {report}")
    for r in report.skipped_rows[:5]:
        log(f"  skipped: {r}")
    eval_examples = []
    if cfg.data.eval_path:
        eval_examples, ereport = data_lib.prepare(cfg.data.eval_path, cfg.data, tok)
        log(f"eval data {cfg.data.eval_path}: {ereport}")
    if len(train_examples) < cfg.train.batch_size:
        raise data_lib.DataError(f"{cfg.data.train_path}: {len(train_examples)} usable pairs, fewer than "
                                 f"train.batch_size={cfg.train.batch_size}")

    # --- mesh, model, reference, optimizer (every check before the workdir is touched)
    mconf = model_config(cfg)
    check_resume(workdir, mconf)
    mesh = shd.make_mesh(cfg.mesh, mconf)
    divisor = shd.batch_rows_divisor(mesh, cfg.mesh)
    if cfg.train.batch_size % divisor or (cfg.train.batch_size // cfg.train.micro_batches) % divisor:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} (per micro-batch "
                          f"{cfg.train.batch_size // cfg.train.micro_batches}) must be divisible by the "
                          f"data-parallel mesh size {divisor} (data x fsdp x expert)")
    prepare_workdir(workdir)
    attn, why = attention.resolve_impl(mconf.attention_impl, mconf.dtype, mconf.resolved_head_dim)
    dispatch = expert_parallel.resolve_dispatch(mconf.moe_dispatch, mesh, mconf.moe_impl)
    log(f"model: {mconf.num_params() / 1e6:.2f}M parameters, {mconf.num_hidden_layers} layers, "
        f"{mconf.num_local_experts} experts (top-{mconf.num_experts_per_tok}), "
        f"moe_impl={mconf.moe_impl} -> {expert_parallel.resolve_local_impl(mconf.moe_impl, mconf.moe_dispatch, mesh)}, "
        f"moe_dispatch={mconf.moe_dispatch} -> {dispatch}, "
        f"attention_impl={mconf.attention_impl} -> {attn} ({why}); "
        f"mesh {dict(mesh.shape)}")
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
    put = functools.partial(shd.put_batch, mesh=mesh, mesh_cfg=cfg.mesh)

    ref_table = eval_ref_table = None
    needs_ref = step_lib.losses.needs_reference(cfg.loss.type)
    if cfg.reference.mode == "precomputed" and needs_ref:
        ref_table = precompute_reference(cfg, mconf, ref_params, train_examples, buckets, workdir / "ref_cache",
                                         tok.fingerprint(), put)
        if eval_examples:
            eval_ref_table = precompute_reference(cfg, mconf, ref_params, eval_examples, buckets,
                                                  workdir / "ref_cache", tok.fingerprint(), put)
        if not mconf.lora_rank:
            ref_params = None  # training never runs the reference again (with LoRA it is the policy's base)
    elif not needs_ref and not mconf.lora_rank:
        ref_params = None

    state = step_lib.init_state(optimizer, params, state_sh, cfg.seed)
    manager = ckpt.Manager(workdir / "checkpoints", keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save)
    start = 0
    restored = manager.restore_newest_intact(state, log)  # onto this run's shardings, whatever mesh saved it
    if restored is not None:
        state = restored[0]
        start = int(state.step)
        log(f"resumed from {workdir / 'checkpoints'} at step {start} (skipped so far: {int(state.skipped)})")
    write_config_json(workdir, raw_config)

    ds_pairs = data_lib.batches(_with_index(train_examples), cfg.train.batch_size, buckets, seed=cfg.seed,
                                process_index=jax.process_index(), process_count=jax.process_count(),
                                batch_fn=lambda xs: _collate_with_ref(xs, buckets, ref_table))
    first = put(ds_pairs[start])
    batch_sh = jax.tree.map(lambda x: x.sharding, first)
    ref_sh = None if ref_params is None else ref_sh
    step_fn = step_lib.jit_train_step(state_sh, batch_sh, ref_sh, config=mconf, loss_cfg=cfg.loss,
                                      optimizer=optimizer, micro_batches=cfg.train.micro_batches,
                                      chunk_size=cfg.train.logps_chunk_size)
    eval_fn = step_lib.on_mesh(jax.jit(functools.partial(step_lib.eval_step, config=mconf, loss_cfg=cfg.loss,
                                                         chunk_size=cfg.train.logps_chunk_size),
                                       out_shardings=state_sh.step), batch_sh)

    def evaluate(params_now) -> dict[str, float]:
        parts: dict[str, list] = {}
        aux_sum, count = 0.0, 0
        for i, (n, chunk) in enumerate(_fixed_chunks(_with_index(eval_examples), cfg.train.batch_size)):
            if cfg.log.eval_batches and i >= cfg.log.eval_batches:
                break
            batch = put(_collate_with_ref(chunk, buckets, eval_ref_table))
            out = jax.device_get(eval_fn(params_now, ref_params, batch))
            for k in ("pc", "pr", "rc", "rr", "loss"):
                parts.setdefault(k, []).append(np.asarray(out[k])[:n])  # the padding pairs are dropped
            aux_sum += float(out["aux"]) * n
            count += n
        per_pair = {k: np.concatenate(v) for k, v in parts.items()}
        m = step_lib.eval_metrics(per_pair, aux_sum / count, config=mconf, loss_cfg=cfg.loss)
        return {f"eval/{k}": v for k, v in m.items()}

    writer = MetricsWriter(workdir, start, cfg.log.tensorboard)
    t_last, steps_since = time.time(), 0
    t_start = time.time()
    window = None  # metrics summed on device since the last log line (no host sync per step)
    for s in range(start, cfg.train.steps):
        batch = first if s == start else put(ds_pairs[s])
        inject = jnp.asarray(cfg.debug.nan_at_step == s + 1)
        state, metrics = step_fn(state, batch, ref_params, inject)
        manager.check()  # a failed background save stops the run now, not at the next save
        window = metrics if window is None else jax.tree.map(jnp.add, window, metrics)
        done = s + 1
        steps_since += 1
        if cfg.train.on_nonfinite == "stop" and not bool(metrics["applied"]):
            manager.wait()
            raise FloatingPointError(f"step {done}: loss or gradients not finite (train.on_nonfinite=stop)")
        if done % cfg.log.every == 0 or done == cfg.train.steps:
            m = jax.device_get(window)
            window = None
            now = time.time()
            tok_s = float(m["tokens"]) / max(now - t_last, 1e-9)
            # Logged values are means over the steps since the last log line.
            rec = {k: np.asarray(v) / steps_since for k, v in m.items() if k not in ("applied", "tokens")}
            rec.update(learning_rate=float(schedule(done - 1)), tokens_per_sec=tok_s,
                       skipped_steps=int(state.skipped))
            writer.write(done, rec)
            eta = (cfg.train.steps - done) * (now - t_start) / max(done - start, 1)
            log(f"step {done}/{cfg.train.steps} loss {float(rec['loss']):.4f} "
                f"acc {float(rec['rewards/accuracies']):.2f} margin {float(rec['rewards/margins']):.3f} "
                f"logp_c {float(rec['logps/chosen']):.2f} gnorm {float(rec['grad_norm']):.2f} "
                f"{tok_s:,.0f} tok/s ETA {eta:.0f}s")
            t_last, steps_since = now, 0
        if eval_examples and cfg.log.eval_every and done % cfg.log.eval_every == 0 and done != cfg.train.steps:
            ev = evaluate(state.params)
            writer.write(done, ev)
            log(f"eval @ {done}: loss {ev['eval/loss']:.4f} acc {ev['eval/rewards/accuracies']:.3f}")
        if done % cfg.checkpoint.every == 0 or done == cfg.train.steps:
            manager.save(done, state, {"data_position": done, "seed": cfg.seed, "model_config": mconf.to_dict(),
                                       **lora_meta(cfg, mconf)})
        if cfg.debug.kill_at_step == done:
            manager.wait()  # the test wants a kill *between* saves, not an interrupted one
            os.kill(os.getpid(), signal.SIGKILL)
    manager.wait()
    result: dict[str, Any] = {"steps": cfg.train.steps, "skipped_steps": int(state.skipped),
                              "seconds": time.time() - t_start}
    if eval_examples:
        ev = evaluate(state.params)
        if start < cfg.train.steps:  # a run resumed when already complete has this line already
            writer.write(cfg.train.steps, ev)
        log(f"eval (final): loss {ev['eval/loss']:.4f} acc {ev['eval/rewards/accuracies']:.3f} "
            f"logps/chosen {ev['eval/logps/chosen']:.2f}")
        result.update(ev)
    writer.close()
    plot_metrics(workdir / "metrics.jsonl", workdir / "metrics.png")
    if cfg.export_hf:
        from jsmaug import hf

        export_conf, export_params = mconf, state.params
        if mconf.lora_rank:  # the merged weights: base + alpha / rank * A @ B, in the base's dtype
            export_conf = mconf.replace(lora_rank=0, param_dtype=cfg.lora.base_dtype)
            export_params = lora.merge(ref_params, state.params, mconf.lora_alpha, mconf.lora_rank)
        summary = hf.save(workdir / "hf", export_conf, export_params, tokenizer_path=tok.path, overwrite=True)
        log(f"exported the final policy to {workdir / 'hf'} ({summary['tensors']} tensors, "
            f"{summary['bytes'] / 1e6:.1f} MB)")
    log(f"done: {result}")
    return result


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        print("usage: python -m jsmaug.train CONFIG.yaml [key=value ...]")
        return 0 if argv else 2
    path = None if "=" in argv[0] else argv.pop(0)
    try:
        cfg, raw = load_run_config(path, argv)
        run(cfg, raw)
    except (ConfigError, data_lib.DataError, ckpt.CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
