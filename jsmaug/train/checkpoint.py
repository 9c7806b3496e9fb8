"""Orbax checkpoints: training state (async, keep the last K, atomic) and converter output (params + config).

Orbax writes each step into a temporary folder and renames it when complete, so a save interrupted mid-write
(kill, crash, full disk) never damages the previous checkpoint; `latest_step()` only sees finished ones.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath

from jsmaug.parallel import distributed
from jsmaug.models.config import ModelConfig
from jsmaug.errors import CheckpointError  # noqa: F401 - re-exported (ckpt.CheckpointError)
from jsmaug.paths import absolute
from jsmaug.train import quantized_base


class Manager:
    """Orbax's CheckpointManager with the faults a user meets turned into one clear error each.

    - A save that fails (disk full, permissions), synchronously or in the async thread, is noticed at the next
      `check()` (called every step), its temporary folder is removed, and a `CheckpointError` names the folder,
      the cause and the newest complete checkpoint.
    - `restore_newest_intact` skips damaged checkpoints (a truncated or deleted data file, a missing
      `_METADATA`), moves them to `<workdir>/damaged_checkpoints/` (nothing is deleted) and says so.
    In a multi-process run every process calls every method (Orbax coordinates the saves); cleaning up and
    moving folders is process 0's alone.
    """

    def __init__(self, directory, keep: int = 3, async_save: bool = True):
        self.directory = absolute(directory)
        self.keep, self.async_save = keep, async_save
        self._pending: int | None = None
        self.mngr = self._open()

    def _open(self):
        options = ocp.CheckpointManagerOptions(max_to_keep=self.keep, enable_async_checkpointing=self.async_save,
                                               create=True)
        return ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.mngr.latest_step()

    def steps(self) -> list[int]:
        """Complete checkpoints, newest first."""
        return sorted(self.mngr.all_steps(), reverse=True)

    def save(self, step: int, state, meta: dict[str, Any], reference=None) -> None:
        """Saves the train state and its metadata; `reference` too when it moves (TR-DPO)."""
        self.check()
        self._pending = step
        items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
        if reference is not None:
            items["reference"] = ocp.args.StandardSave(reference)
        try:
            self.mngr.save(step, args=ocp.args.Composite(**items))
        except Exception as err:  # noqa: BLE001 - any failure of a save becomes one named error
            self._fail(step, err)

    def check(self) -> None:
        """Raises `CheckpointError` if a background save has failed (cheap: call it every step)."""
        if self._pending is not None and not self.mngr.is_saving_in_progress():
            self.wait()  # the save is over: this returns at once, or raises what went wrong
            self._pending = None
        try:
            self.mngr.check_for_errors()
        except Exception as err:  # noqa: BLE001
            self._fail(self._pending, err)

    def wait(self) -> None:
        try:
            self.mngr.wait_until_finished()
            self.mngr.check_for_errors()
        except Exception as err:  # noqa: BLE001
            self._fail(self._pending, err)

    def _fail(self, step: int | None, err: BaseException):
        # The save that failed may be an earlier async one that the next save ran into: its temporary folder
        # is named in the error.
        named = re.search(r"/(\d+)\.orbax-checkpoint-tmp", "".join(str(e) for e in _chain(err)))
        step = int(named.group(1)) if named else step
        try:  # let Orbax's writer threads end first, or one of them may recreate the folder after it is removed
            self.mngr.wait_until_finished()
        except Exception:  # noqa: BLE001 - the same failure again; it is reported below
            pass
        leftovers = self._remove_temporary_folders() if distributed.is_writer() else []
        complete = [s for s in self.steps() if s != step] if self.directory.exists() else []
        after = (f"the newest complete checkpoint is step {complete[0]} ({self.directory / str(complete[0])}); "
                 "running the same command again resumes from it") if complete else \
            "there is no complete checkpoint yet; running the same command again starts from the beginning"
        removed = ("Its temporary folder was removed" if not leftovers else
                   "Its temporary folder could not be removed (" + ", ".join(leftovers) + "; delete it by hand)")
        raise CheckpointError(f"{self.directory}: saving the checkpoint of step {step} failed: {root_cause(err)}. "
                              f"{removed}; {after}") from err

    def _remove_temporary_folders(self, seconds: float = 10.0) -> list[str]:
        """Removes Orbax's temporary folders; returns the names of those still there after `seconds`.

        A writer thread of the failed save can still be adding files while the folder is removed: `rmtree`
        then fails with ENOTEMPTY (or a file vanishes under it), so each failure is retried until the folder
        stays gone. Such an OSError, which is not a CheckpointError, is the likeliest cause of a disk-full run on a
        loaded CI machine (2026-12-07) that ended with exit code 1 instead of the one named error (not
        reproduced in 24 runs, 4 at a time)."""
        deadline = time.monotonic() + seconds
        while True:
            try:
                leftovers = list(self.directory.glob("*.orbax-checkpoint-tmp*"))
            except OSError:  # the folder changing under the listing: list it again
                leftovers = None
            if leftovers == []:
                return []
            for tmp in leftovers or ():
                try:
                    tmp.rmtree(missing_ok=True)
                except OSError:
                    pass
            if time.monotonic() > deadline:
                return [t.name for t in leftovers or () if t.exists()]
            time.sleep(0.05)

    def restore(self, abstract_state, step: int | None = None, abstract_reference=None):
        """(state, meta) of a step; with `abstract_reference`, (state, meta, reference)."""
        step = self.latest_step() if step is None else step
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
        items = {"state": ocp.args.StandardRestore(target), "meta": ocp.args.JsonRestore()}
        if abstract_reference is not None:
            if not (self.directory / str(step) / "reference").exists():
                raise CheckpointError(f"{self.directory / str(step)}: holds no reference, but reference.sync_every "
                                      "needs the one it moved to (it was saved without TR-DPO)")
            items["reference"] = ocp.args.StandardRestore(jax.tree.map(ocp.utils.to_shape_dtype_struct,
                                                                       abstract_reference))
        out = self.mngr.restore(step, args=ocp.args.Composite(**items))
        return (out.state, out.meta) if abstract_reference is None else (out.state, out.meta, out.reference)

    def restore_newest_intact(self, abstract_state, log=print, abstract_reference=None):
        """(state, meta, step, reference) of the newest checkpoint that restores (reference: None unless
        `abstract_reference` is given, for TR-DPO). A checkpoint that does not restore is
        damaged when its own metadata is unreadable or its files do not hold what the metadata says; it is moved
        aside once an older one restores. A checkpoint whose structure simply differs from `abstract_state`
        (another optimizer or model) is not damaged: that is an error naming both."""
        damaged: list[tuple[int, str]] = []
        for step in self.steps():
            problem = self._structure_problem(step, abstract_state)
            if problem and not problem.startswith("damaged: "):
                raise CheckpointError(f"{self.directory / str(step)}: {problem}")
            if not problem:
                try:
                    out = self.restore(abstract_state, step, abstract_reference)
                except CheckpointError:
                    raise
                except Exception as err:  # noqa: BLE001
                    problem = f"damaged: {root_cause(err)}"
                else:
                    self._set_aside(damaged, log, step)
                    return out[0], out[1], step, (out[2] if abstract_reference is not None else None)
            damaged.append((step, problem[len("damaged: "):]))
        if damaged:
            names = "; ".join(f"{self.directory / str(s)}: {why}" for s, why in damaged)
            raise CheckpointError(f"no intact checkpoint to resume from ({names}). To start this run again from "
                                  f"the beginning, move {self.directory} away")
        return None

    def _structure_problem(self, step: int, abstract_state) -> str | None:
        try:
            stored = ocp.PyTreeCheckpointHandler().metadata(self.directory / str(step) / "state")
            stored_leaves = jax.tree_util.tree_flatten_with_path(getattr(stored, "tree", stored))[0]
        except Exception as err:  # noqa: BLE001
            return f"damaged: its metadata cannot be read ({root_cause(err)})"
        if not stored_leaves:
            return "damaged: its metadata lists no arrays"
        want = {_path_name(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(abstract_state)[0]}
        have = {_path_name(p): tuple(getattr(x, "shape", ()) or ()) for p, x in stored_leaves}
        if set(want) != set(have):
            extra, missing = sorted(set(have) - set(want)), sorted(set(want) - set(have))
            return (f"holds a different training state (arrays only in the checkpoint: {extra[:3]}; only in "
                    f"this run: {missing[:3]}); was it written with another optimizer or model config?")
        for k in sorted(want):
            if want[k] != have[k]:
                return f"array {k} has shape {have[k]} in the checkpoint but {want[k]} in this run"
        return None

    def _set_aside(self, damaged, log, restored_step: int) -> None:
        if not damaged:
            return
        dest_root = self.directory.parent / "damaged_checkpoints"
        stamp = time.strftime('%Y%m%d-%H%M%S')
        for step, why in damaged:
            dest = dest_root / f"{step}-{stamp}"
            if distributed.is_writer():
                dest_root.mkdir(exist_ok=True)
                (self.directory / str(step)).rename(dest)
            log(f"warning: checkpoint {self.directory / str(step)} is damaged ({why}); moved it to {dest}")
        distributed.sync("jsmaug_damaged_checkpoints_moved")
        log(f"resuming from the newest intact checkpoint, step {restored_step}")
        self.mngr.close()
        self.mngr = self._open()


def _path_name(path) -> str:
    """'params/layers/w1' for a tree path, whether the tree holds dicts, named tuples or lists."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _chain(err: BaseException) -> list[BaseException]:
    out = [err]
    while out[-1].__cause__ is not None or (out[-1].__context__ is not None and not out[-1].__suppress_context__):
        out.append(out[-1].__cause__ or out[-1].__context__)
    return out


def root_cause(err: BaseException) -> str:
    """What went wrong, in a line: the OS error where there is one (Orbax and TensorStore wrap it several times,
    e.g. `No space left on device [os_error_code='28']`), else the innermost exception as `Type: message`."""
    for e in _chain(err):
        if isinstance(e, OSError) and e.strerror:
            return f"{e.strerror}" + (f": {e.filename}" if e.filename else "")
        code = re.search(r"os_error_code='(\d+)'", str(e))
        if code:
            return f"{os.strerror(int(code.group(1)))} (errno {code.group(1)})"
    inner = _chain(err)[-1]
    msg = str(inner).strip().splitlines()[0] if str(inner).strip() else ""
    return f"{type(inner).__name__}: {msg}" if msg else type(inner).__name__


class _NoTracebacks(logging.Filter):
    """Orbax logs every failed background write with a full traceback (hundreds of lines for one full disk);
    the Manager raises one error that names the cause, so its log records keep their message only."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.exc_info, record.exc_text = None, None
        return True


logging.getLogger("absl").addFilter(_NoTracebacks())


# ------------------------------------------------------------------------------------------------ params only

def save_params(out_dir, config: ModelConfig, params) -> None:
    """The converter's output: `out_dir/params` (Orbax PyTree) and `out_dir/model_config.json`. Quantized leaves
    (`jsmaug convert --quantize`) are stored as their packed values and scales (`quantized_base`); the caller
    writes the quantization record beside them."""
    out_dir = absolute(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as c:
        c.save(out_dir / "params", quantized_base.to_storage(params))
    (out_dir / "model_config.json").write_text(json.dumps(config.to_dict(), indent=2))


def _model_config_of(path: epath.Path) -> ModelConfig:
    try:
        return ModelConfig.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{path}: not a model config ({err})") from err


def _target(config: ModelConfig, shardings):
    from jsmaug.models import decoder as model

    shapes = model.param_shapes(config)
    if shardings is None:
        return shapes
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def read_model_config(path, step: int | None = None) -> ModelConfig:
    """The model config stored with a converter checkpoint or a training workdir's checkpoint."""
    path = absolute(path)
    if (path / "model_config.json").exists():
        return _model_config_of(path / "model_config.json")
    mngr, step = _training_manager(path, step)
    meta = _read_meta(mngr, step)
    if "model_config" not in meta:
        raise CheckpointError(f"{mngr.directory}/{step}: checkpoint metadata has no model_config")
    return ModelConfig.from_dict(meta["model_config"])


def load_params(path, step: int | None = None, shardings=None, quantized: bool = False) -> tuple[ModelConfig, Any]:
    """Params from a converter checkpoint (`model_config.json` + `params/`) or from a training workdir
    (`checkpoints/<step>/`, the latest unless `step`). With `shardings` (a pytree of NamedSharding) each
    array is restored straight onto its devices, resharding if it was saved on another mesh.

    A converter checkpoint with a quantized base (`quantized_base.RECORD`) is refused unless `quantized` (a QLoRA
    base's loader): then its packed values and scales are restored as they are, as `quant.QuantizedArray`s
    (`shardings` then a tree like `quantize_base`'s output, e.g. a QLoRA plan's base shardings)."""
    path = absolute(path)
    config = read_model_config(path, step)
    if config.lora_rank:
        return _load_lora_merged(path, config, step)
    rec = quantized_base.read_record(path) if (path / "model_config.json").exists() else None
    if rec is not None and not quantized:
        raise CheckpointError(quantized_base.refusal(path, rec))
    if rec is not None:
        abstract = quantized_base.abstract(config, rec)
        with ocp.StandardCheckpointer() as c:
            stored = c.restore(path / "params", quantized_base.storage_target(abstract, shardings))
        return config, quantized_base.from_storage(stored, abstract)
    target = _target(config, shardings)
    if (path / "model_config.json").exists():
        with ocp.StandardCheckpointer() as c:
            return config, c.restore(path / "params", target)
    mngr, step = _training_manager(path, step)
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(item={"params": target}, partial_restore=True)))
    return config, restored.state["params"]


def _read_meta(mngr, step: int) -> dict:
    """The JSON metadata saved beside a training checkpoint's state (data position, seed, model config...)."""
    return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta


def stored_model_config(checkpoint_dir) -> tuple[int, dict] | None:
    """(step, model_config dict) from the newest checkpoint in `checkpoint_dir` whose metadata reads; None if
    the folder holds no complete checkpoint. Creates nothing."""
    checkpoint_dir = absolute(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        return None
    mngr = ocp.CheckpointManager(checkpoint_dir, options=ocp.CheckpointManagerOptions(create=False))
    for step in sorted(mngr.all_steps(), reverse=True):
        try:
            meta = _read_meta(mngr, step)
        except Exception:  # noqa: BLE001 - a damaged checkpoint: restore_newest_intact deals with it
            continue
        if isinstance(meta, dict) and "model_config" in meta:
            return step, meta["model_config"]
    return None


def _load_lora_merged(path: epath.Path, config: ModelConfig, step: int | None):
    """A LoRA workdir's policy: its adapters folded into the base they were trained on (which the checkpoint
    names but does not store: `init_from`, or the seed of a random init). Returns the config without adapters."""
    from jsmaug.models import lora

    base_config, base, adapters = load_lora_parts(path, config, step)
    dtype = jnp.dtype(base_config.param_dtype)
    return base_config, lora.merge(base, adapters, config.lora_alpha, config.lora_rank, quantized_dtype=dtype)


def load_lora_parts(path, config: ModelConfig, step: int | None):
    """(base config, base, adapters) of a LoRA workdir: the base as the run computed with it (a QLoRA base
    quantized, in its `quant.QuantizedArray`s) and the adapters on the base's devices."""
    from jsmaug.models import lora, decoder as model, quant

    path = absolute(path)
    mngr, step = _training_manager(path, step)
    meta = _read_meta(mngr, step)
    base_info = meta.get("lora_base")
    if not base_info:
        raise CheckpointError(f"{mngr.directory}/{step}: a LoRA checkpoint without lora_base in its metadata")
    adapter_target = lora.split(model.param_shapes(config))[1]
    adapters = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(item={"params": adapter_target}, partial_restore=True))).state["params"]
    base_config = config.replace(lora_rank=0)
    if base_info["init_from"]:  # a base quantized by the converter is loaded packed, as the run loaded it
        base = load_params(base_info["init_from"], quantized=base_info.get("quant", "none") != "none")[1]
    else:
        base = model.init_params(base_config, jax.random.key(base_info["seed"]))  # jitted, as the trainer's init
    dtype = jnp.dtype(base_info["dtype"])
    base = jax.tree.map(lambda x: x if quant.is_quantized(x) else x.astype(dtype), base, is_leaf=quant.is_quantized)
    if base_info.get("quant", "none") != "none":  # QLoRA: the adapters were trained on the quantized base
        base = jax.jit(lambda b: lora.quantize_base(b, base_info["quant"], base_info["quant_group"],
                                                       embeddings=base_info.get("quant_embeddings", False)))(base)
    first = jax.tree.leaves(base)[0].sharding
    if isinstance(first, jax.sharding.SingleDeviceSharding):  # a converter's base restores onto one device, the
        adapters = jax.device_put(adapters, first)  # adapters onto the run's mesh: merged where the base is
    return base_config.replace(param_dtype=base_info["dtype"]), base, adapters


def _training_manager(path: epath.Path, step: int | None):
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint folder")
    ckdir = path / "checkpoints" if (path / "checkpoints").exists() else path
    mngr = ocp.CheckpointManager(ckdir, options=ocp.CheckpointManagerOptions(create=False))
    steps = mngr.all_steps()
    if not steps:
        raise CheckpointError(f"{path}: neither a converter checkpoint (model_config.json + params/) nor a "
                              "training workdir with complete checkpoints")
    step = max(steps) if step is None else step
    if step not in steps:
        raise CheckpointError(f"{ckdir}: no checkpoint for step {step}; available: {sorted(steps)}")
    return mngr, step
