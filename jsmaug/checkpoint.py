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


def load_params(path: str | Path, step: int | None = None) -> tuple[MixtralConfig, Any]:
    """Params from a converter checkpoint (`model_config.json` + `params/`) or from a training workdir
    (`checkpoints/<step>/`, the latest unless `step`)."""
    path = Path(path).absolute()
    from jsmaug import model

    if (path / "model_config.json").exists():
        config = _model_config_of(path / "model_config.json")
        target = model.param_shapes(config)
        with ocp.StandardCheckpointer() as c:
            return config, c.restore(path / "params", target)
    ckdir = path / "checkpoints" if (path / "checkpoints").exists() else path
    mngr = ocp.CheckpointManager(ckdir)
    steps = mngr.all_steps()
    if not steps:
        raise CheckpointError(f"{path}: neither a converter checkpoint (model_config.json + params/) nor a "
                              "training workdir with complete checkpoints")
    step = max(steps) if step is None else step
    if step not in steps:
        raise CheckpointError(f"{ckdir}: no checkpoint for step {step}; available: {sorted(steps)}")
    meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    if "model_config" not in meta:
        raise CheckpointError(f"{ckdir}/{step}: checkpoint metadata has no model_config")
    config = MixtralConfig.from_dict(meta["model_config"])
    target = model.param_shapes(config)
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(item={"params": target}, partial_restore=True)))
    return config, restored.state["params"]
