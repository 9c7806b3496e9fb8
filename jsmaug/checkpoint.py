"""Orbax checkpoints: training state (async, keep the last K, atomic) and converter output (params + config).

Orbax writes each step into a temporary folder and renames it when complete, so a save interrupted mid-write
(kill, crash, full disk) never damages the previous checkpoint; `latest_step()` only sees finished ones.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from jsmaug.config import MixtralConfig


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be used; the message names it."""


class Manager:
    def __init__(self, directory: Path, keep: int = 3, async_save: bool = True):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
        self.mngr = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.mngr.latest_step()

    def save(self, step: int, state, meta: dict[str, Any]) -> None:
        self.mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                      meta=ocp.args.JsonSave(meta)))

    def restore(self, abstract_state, step: int | None = None):
        step = self.latest_step() if step is None else step
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
        out = self.mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                               meta=ocp.args.JsonRestore()))
        return out.state, out.meta

    def wait(self) -> None:
        self.mngr.wait_until_finished()


# ------------------------------------------------------------------------------------------------ params only

def save_params(out_dir: Path, config: MixtralConfig, params) -> None:
    """The converter's output: `out_dir/params` (Orbax PyTree) and `out_dir/model_config.json`."""
    out_dir = Path(out_dir).absolute()
    out_dir.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as c:
        c.save(out_dir / "params", params)
    (out_dir / "model_config.json").write_text(json.dumps(config.to_dict(), indent=2))


def _model_config_of(path: Path) -> MixtralConfig:
    return MixtralConfig.from_dict(json.loads(path.read_text()))


def _target(config: MixtralConfig, shardings):
    from jsmaug import model

    shapes = model.param_shapes(config)
    if shardings is None:
        return shapes
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def read_model_config(path: str | Path, step: int | None = None) -> MixtralConfig:
    """The model config stored with a converter checkpoint or a training workdir's checkpoint."""
    path = Path(path).absolute()
    if (path / "model_config.json").exists():
        return _model_config_of(path / "model_config.json")
    mngr, step = _training_manager(path, step)
    meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    if "model_config" not in meta:
        raise CheckpointError(f"{mngr.directory}/{step}: checkpoint metadata has no model_config")
    return MixtralConfig.from_dict(meta["model_config"])


def load_params(path: str | Path, step: int | None = None, shardings=None) -> tuple[MixtralConfig, Any]:
    """Params from a converter checkpoint (`model_config.json` + `params/`) or from a training workdir
    (`checkpoints/<step>/`, the latest unless `step`). With `shardings` (a pytree of NamedSharding) each
    array is restored straight onto its devices, resharding if it was saved on another mesh."""
    path = Path(path).absolute()
    config = read_model_config(path, step)
    target = _target(config, shardings)
    if (path / "model_config.json").exists():
        with ocp.StandardCheckpointer() as c:
            return config, c.restore(path / "params", target)
    mngr, step = _training_manager(path, step)
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(item={"params": target}, partial_restore=True)))
    return config, restored.state["params"]


def _training_manager(path: Path, step: int | None):
    ckdir = path / "checkpoints" if (path / "checkpoints").exists() else path
    mngr = ocp.CheckpointManager(ckdir)
    steps = mngr.all_steps()
    if not steps:
        raise CheckpointError(f"{path}: neither a converter checkpoint (model_config.json + params/) nor a "
                              "training workdir with complete checkpoints")
    step = max(steps) if step is None else step
    if step not in steps:
        raise CheckpointError(f"{ckdir}: no checkpoint for step {step}; available: {sorted(steps)}")
    return mngr, step
