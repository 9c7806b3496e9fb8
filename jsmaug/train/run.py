"""DPOP training end to end: `jsmaug train CONFIG.yaml|NAME [key=value ...]` (or `python -m jsmaug.train ...`).

    jsmaug train tiny_dpop                                  # a shipped config (jsmaug configs lists them)
    jsmaug train my_run.yaml train.steps=200 workdir=runs/mine init_from=ckpt/model

A run has four phases, each a function below: `load_data` (files -> tokenised pairs), `setup.build` (the
plan of jsmaug.train.plan, then the model, reference, optimizer and restored state), `train_loop` (the step
compiled ahead for every batch shape its first steps need, jsmaug.train.programs; jitted steps -> metrics and
Orbax checkpoints) and `finish` (final eval, plot, HF export of the final policy in workdir/hf).
What each process writes is decided in one place, `jsmaug.train.outputs`; in a multi-process run (one process per
host, `jsmaug.parallel.distributed`) process 0 writes.

Resume: a run started with a workdir that holds checkpoints restores the latest complete one (params,
optimizer state, step, RNG, skipped count; the data position is the step, since batch i is a pure function of
(data, seed, i)) and continues exactly where it stopped. Preemption: on SIGTERM every process saves the same
step, prints `preempted at step N: checkpoint saved` and exits with code 143; the same command resumes.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import signal
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jsmaug.data import balanced, batches as data_lib, formats as pair_formats, packing, tokenizer_folder
from jsmaug.models.config import ConfigError
from jsmaug.parallel import distributed, sharding as shd
from jsmaug.train import checkpoint as ckpt, programs, setup as run_setup, step as step_lib
from jsmaug.train.config import RunConfig, load_run_config
from jsmaug.train import metrics_log
from jsmaug.train.metrics_log import log, speak
from jsmaug.train.outputs import RunOutputs
from jsmaug.train.reference_cache import fixed_chunks

# ------------------------------------------------------------------------------------------------ phase 1: data

@dataclasses.dataclass
class RunData:
    tok: data_lib.Tokenizer
    buckets: tuple[int, ...]
    train: list[dict]  # tokenised pairs, each with its `index` in the list
    eval: list[dict]
    chat_template: str | None  # the Jinja source conversations were rendered with (it goes into the export)


def _with_index(examples):
    return [dict(ex, index=np.int32(i)) for i, ex in enumerate(examples)]


def load_data(cfg: RunConfig) -> RunData:
    """Every process reads and tokenises the same files (cheap next to a step); nothing is written."""
    # data.tokenizer_path, else init_from's own tokenizer files, else Mixtral's (jsmaug.data.tokenizer_folder).
    tok = data_lib.Tokenizer(tokenizer_folder.run_tokenizer_path(cfg.data.tokenizer_path, cfg.init_from))
    log(f"tokenizer: {tok.path} ({tok.kind}, {tok.vocab_size} tokens, EOS {tok.eos_token!r})")
    if tok.note:
        log(f"note: {tok.note}")
    train, report = data_lib.prepare(cfg.data.train_path, cfg.data, tok)
    log(f"train data {cfg.data.train_path}: {report}")
    for r in report.skipped_rows[:5]:
        log(f"  skipped: {r}")
    evals = []
    if cfg.data.eval_path:
        evals, ereport = data_lib.prepare(cfg.data.eval_path, cfg.data, tok)
        log(f"eval data {cfg.data.eval_path}: {ereport}")
    if len(train) < cfg.train.batch_size:
        raise data_lib.DataError(f"{cfg.data.train_path}: {len(train)} usable pairs, fewer than "
                                 f"train.batch_size={cfg.train.batch_size}")
    template = pair_formats.load_chat_template(cfg.data.chat_template, tok)
    return RunData(tok=tok, buckets=data_lib.bucket_lengths(cfg.data), train=_with_index(train),
                   eval=_with_index(evals), chat_template=template.source if template else None)


# ------------------------------------------------------------------------------------------------ evaluation

class Evaluator:
    """Held-out metrics over the eval pairs (full batches; the padding pairs of the last one are dropped). Every
    process gets the same numbers: the per-pair outputs come back replicated."""

    def __init__(self, cfg: RunConfig, setup: run_setup.Setup, run_data: RunData, batch_sh):
        self.cfg, self.setup, self.examples = cfg, setup, run_data.eval
        fn = jax.jit(functools.partial(step_lib.eval_step, config=setup.config, loss_cfg=cfg.loss,
                                       chunk_size=cfg.train.logps_chunk_size), out_shardings=setup.state_sh.step)
        self.fn = step_lib.on_mesh(fn, batch_sh)

    def __call__(self, params) -> dict[str, float]:
        parts: dict[str, list] = {}
        aux_sum, count = 0.0, 0
        for i, (n, chunk) in enumerate(fixed_chunks(self.examples, self.cfg.train.batch_size)):
            if self.cfg.log.eval_batches and i >= self.cfg.log.eval_batches:
                break
            out = jax.device_get(self.fn(params, self.setup.ref_params, self.setup.place(chunk, self.setup.eval_ref)))
            for k in (*step_lib.PAIR_LOGPS, "loss"):
                parts.setdefault(k, []).append(np.asarray(out[k])[:n])  # the padding pairs are dropped
            aux_sum += float(out["aux"]) * n
            count += n
        per_pair = {k: np.concatenate(v) for k, v in parts.items()}
        m = step_lib.eval_metrics(per_pair, aux_sum / count, config=self.setup.config, loss_cfg=self.cfg.loss)
        return {f"eval/{k}": v for k, v in m.items()}


# ------------------------------------------------------------------------------------------------ phase 3: steps

def _save(cfg: RunConfig, setup: run_setup.Setup, state, step: int) -> None:
    meta = {"data_position": step, "seed": cfg.seed, "model_config": setup.config.to_dict(),
            **run_setup.lora_meta(cfg, setup.config)}
    setup.manager.save(step, state, meta, reference=setup.ref_params if cfg.reference.sync_every else None)


def _reference_mixer(cfg: RunConfig, setup: run_setup.Setup):
    """TR-DPO's update (Gorbatovski et al., arXiv 2404.09656; TRL's sync_ref_model): every `sync_every` steps
    ref <- alpha * policy + (1 - alpha) * ref, in the reference's dtype and shardings."""
    alpha = cfg.reference.mixup_alpha

    def mix(policy, ref):
        return jax.tree.map(lambda p, r: (alpha * p.astype(jnp.float32) + (1 - alpha) * r.astype(jnp.float32)
                                          ).astype(r.dtype), policy, ref)
    return jax.jit(mix, out_shardings=setup.ref_sh, donate_argnums=1)


def _log_padding(cfg: RunConfig, setup: run_setup.Setup, ds) -> None:
    """The share of token slots spent on padding, without and with packing, over the run's first steps (up to
    200 of them; the steps the packed layout was chosen from): the data summary's line about packing."""
    n = min(cfg.train.steps, programs.SAMPLE_STEPS)
    shards = shd.batch_rows_divisor(setup.mesh, cfg.mesh)
    padded, packed = packing.padding_fractions([ds[i] for i in range(n)], micro=cfg.train.micro_batches,
                                               shards=shards, buckets=data_lib.bucket_lengths(cfg.data),
                                               row_length=cfg.data.packing_length, run_length=setup.run_length,
                                               shared=cfg.data.share_prompt)
    use = "on" if cfg.data.packing else "off (data.packing=true to pack)"
    if balanced.is_balanced(cfg.data):
        use += ", steps of near-equal tokens (data.balanced_steps)"
    if cfg.data.share_prompt:
        use += ", each pair's prompt once (data.share_prompt)"
    log(f"padding: {padded:.1%} of token slots padded, {packed:.1%} packed, over {n} steps; packing {use}")


def _log_window(setup, writer, state, done: int, steps: int, window, steps_since: int, t_last: float,
                t_start: float, start: int) -> float:
    """The metrics of the steps since the last line (summed on device), as means: one JSON line, one console line.
    The window's time ends once its metrics are on the host, so it holds its own steps' work (a clock read before
    the wait would give the last step's work to the next window). Returns that time."""
    m = jax.device_get(window)
    now = time.time()
    tok_s = float(m["tokens"]) / max(now - t_last, 1e-9)
    eta = (steps - done) * (now - t_start) / max(done - start, 1)
    rec = {k: np.asarray(v) / steps_since for k, v in m.items() if k not in ("applied", "tokens")}
    rec.update(learning_rate=float(setup.schedule(done - 1)), tokens_per_sec=tok_s, tokens=float(m["tokens"]),
               skipped_steps=int(state.skipped))
    writer.write(done, rec)
    load = metrics_log.expert_load_summary(rec.get("moe/expert_load", []))
    experts = (f"experts {load['moe/expert_load_min']:.2f}-{load['moe/expert_load_max']:.2f}x mean "
               f"H {load['moe/expert_load_entropy']:.3f} ") if load else ""
    log(f"step {done}/{steps} loss {float(rec['loss']):.4f} acc {float(rec['rewards/accuracies']):.2f} "
        f"margin {float(rec['rewards/margins']):.3f} logp_c {float(rec['logps/chosen']):.2f} "
        f"gnorm {float(rec['grad_norm']):.2f} {experts}{tok_s:,.0f} tok/s ETA {eta:.0f}s")
    return now


def train_loop(cfg: RunConfig, setup: run_setup.Setup, run_data: RunData, outputs: RunOutputs, writer,
               preemption: distributed.Preemption):
    """Steps `setup.start` .. `train.steps`: metrics every `log.every` steps (means over the window, summed on
    device: no host sync per step), eval every `log.eval_every`, a checkpoint every `checkpoint.every`, and at a
    preemption point the checkpoint of that step, then `distributed.Preempted`. Returns (state, evaluator,
    seconds)."""
    state, start, steps = setup.state, setup.start, cfg.train.steps
    ds = programs.run_batches(run_data.train, cfg, setup.plan.batch_divisor)
    micro = cfg.train.micro_batches
    _log_padding(cfg, setup, ds)
    shapes = programs.ShapeLog(log)
    cpu = time.process_time()
    setup.timings["compile_ahead_seconds"] = programs.compile_ahead(cfg, setup, ds, start, run_data.buckets, shapes)
    setup.timings["compile_ahead_cpu_seconds"] = time.process_time() - cpu
    first = setup.place(ds[start], setup.train_ref, micro)
    step_fn = setup.plan.step  # the one program of jsmaug.train.plan (what `jsmaug plan` compiles)
    evaluate = Evaluator(cfg, setup, run_data, jax.tree.map(lambda x: x.sharding, setup.plan.batch_shapes()))
    mix = _reference_mixer(cfg, setup) if cfg.reference.sync_every else None
    t_last = t_start = time.time()
    cpu = time.process_time()
    steps_since, window, saved = 0, None, None
    for s in range(start, steps):
        batch = first if s == start else setup.place(ds[s], setup.train_ref, micro)
        shapes.seen(s + 1, tuple(batch["input_ids"].shape))
        state, metrics = step_fn(state, batch, setup.ref_params, jnp.asarray(cfg.debug.nan_at_step == s + 1))
        setup.manager.check()  # a failed background save stops the run now, not at the next save
        window = metrics if window is None else jax.tree.map(jnp.add, window, metrics)
        done = s + 1
        steps_since += 1
        if cfg.train.on_nonfinite == "stop" and not bool(metrics["applied"]):
            setup.manager.wait()
            raise FloatingPointError(f"step {done}: loss or gradients not finite (train.on_nonfinite=stop)")
        if done % cfg.log.every == 0 or done == steps:
            t_last = _log_window(setup, writer, state, done, steps, window, steps_since, t_last, t_start, start)
            steps_since, window = 0, None
        if run_data.eval and cfg.log.eval_every and done % cfg.log.eval_every == 0 and done != steps:
            ev = evaluate(state.params)
            writer.write(done, ev)
            log(f"eval @ {done}: loss {ev['eval/loss']:.4f} acc {ev['eval/rewards/accuracies']:.3f}")
        if cfg.reference.sync_every and done % cfg.reference.sync_every == 0:  # TR-DPO
            setup.ref_params = mix(state.params, setup.ref_params)
        if done % cfg.checkpoint.every == 0 or done == steps:
            _save(cfg, setup, state, done)
            saved = done
        if cfg.debug.kill_at_step == done:
            setup.manager.wait()  # the test wants a kill *between* saves, not an interrupted one
            os.kill(os.getpid(), signal.SIGKILL)
        if cfg.debug.sigterm_at_step == done:
            os.kill(os.getpid(), signal.SIGTERM)  # what a scheduler sends every host before taking it
        if preemption.reached(done):  # asked on every process at every step
            if saved != done:
                _save(cfg, setup, state, done)
            setup.manager.wait()
            log(f"preempted at step {done}: checkpoint saved in {outputs.checkpoints / str(done)}")
            raise distributed.Preempted(done)
    setup.manager.wait()
    setup.timings["loop_cpu_seconds"] = time.process_time() - cpu
    return state, evaluate, time.time() - t_start


# ------------------------------------------------------------------------------------------------ phase 4: finish

def finish(cfg: RunConfig, setup: run_setup.Setup, run_data: RunData, outputs: RunOutputs, writer, state,
           evaluate, seconds: float) -> dict[str, Any]:
    """The final eval (logged once, also when a finished run is started again), the plot, the HF export."""
    result: dict[str, Any] = {"steps": cfg.train.steps, "skipped_steps": int(state.skipped), "seconds": seconds,
                              **{k: round(v, 2) for k, v in setup.timings.items()}}
    if run_data.eval:
        ev = evaluate(state.params)
        if not writer.logged(cfg.train.steps, "eval/loss"):  # a finished run started again has it already
            writer.write(cfg.train.steps, ev)
        log(f"eval (final): loss {ev['eval/loss']:.4f} acc {ev['eval/rewards/accuracies']:.3f} "
            f"logps/chosen {ev['eval/logps/chosen']:.2f}")
        result.update(ev)
    writer.close()
    outputs.plot()
    if cfg.export_hf:
        from jsmaug.models import lora

        config, params = setup.config, state.params
        if config.lora_rank:  # the merged weights: base + alpha / rank * A @ B, in the base's dtype
            params = lora.merge(setup.ref_params, state.params, config.lora_alpha, config.lora_rank,
                                quantized_dtype=cfg.lora.base_dtype)
            config = config.replace(lora_rank=0, param_dtype=cfg.lora.base_dtype)
        summary = outputs.export_hf(config, params, run_data.tok.path, run_data.chat_template)
        log(f"exported the final policy to {outputs.workdir / 'hf'} ({summary['tensors']} tensors, "
            f"{summary['bytes'] / 1e6:.1f} MB)")
    log(f"done: {result}")
    return result


# ------------------------------------------------------------------------------------------------ the run

def run(cfg: RunConfig, raw_config: dict | None = None) -> dict[str, Any]:
    distributed.initialize(cfg.distributed)  # before any other JAX call
    speak(distributed.is_writer())
    cache_line = programs.configure_cache(cfg.compilation_cache)  # before the first compile
    outputs = RunOutputs(cfg.workdir, writer=distributed.is_writer())
    log(f"jsmaug: workdir {outputs.workdir}, backend {jax.default_backend()} x{jax.device_count()} "
        f"({jax.process_count()} process{'es' if jax.process_count() > 1 else ''}, "
        f"{jax.local_device_count()} devices each)")
    log(cache_line)
    run_data = load_data(cfg)
    setup = run_setup.build(cfg, run_data, outputs)
    outputs.write_config(raw_config)  # the run is known to go ahead
    writer = outputs.metrics(setup.start, cfg.log.tensorboard)
    preemption = distributed.Preemption(log)
    try:
        state, evaluate, seconds = train_loop(cfg, setup, run_data, outputs, writer, preemption)
    except BaseException:
        writer.close()
        raise
    finally:
        preemption.close()
    return finish(cfg, setup, run_data, outputs, writer, state, evaluate, seconds)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        print("usage: jsmaug train CONFIG.yaml|SHIPPED_NAME [key=value ...]   (or python -m jsmaug.train ...)")
        return 0 if argv else 2
    path = None if "=" in argv[0] else argv.pop(0)
    cfg = None
    try:
        cfg, raw = load_run_config(path, argv)
        run(cfg, raw)
    except (ConfigError, data_lib.DataError, ckpt.CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return distributed.EXIT_ERROR
    except distributed.Preempted:
        return distributed.EXIT_PREEMPTED
    except Exception as err:  # noqa: BLE001 - a peer gone in a multi-process run ends here; anything else re-raises
        distributed.stop_on_peer_failure(err, f"{cfg.workdir if cfg else 'the workdir'}/checkpoints")
        raise
    return 0

