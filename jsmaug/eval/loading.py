"""Loading the model and tokenizer an evaluation scores: an HF folder, a converter checkpoint or a workdir."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax

from jsmaug.models.config import ModelConfig


def load_model(path: str | Path, dtype: str | None = None, mesh_config=None) -> tuple[ModelConfig, Any]:
    """(config, params) from a Hugging Face folder (config.json + safetensors), a converter checkpoint
    (model_config.json + params/) or a training workdir (its latest checkpoint). `mesh_config` (a
    `sharding.MeshConfig`): each array goes straight onto its devices of that mesh, by the run's rule table; the
    mesh may span processes (every process then loads its own parts). A LoRA workdir loads on one device first,
    so on a mesh of one process only: export it (`jsmaug export`) for several."""
    from jsmaug import hf
    from jsmaug.train import checkpoint as ckpt

    path = Path(path)
    if not path.exists():
        raise ckpt.CheckpointError(f"{path}: no such model folder")

    def shardings(config: ModelConfig):
        from jsmaug.parallel import sharding as shd

        return shd.param_shardings(config, shd.make_mesh(mesh_config, config), mesh_config)

    if (path / "config.json").exists() and any(path.glob("*.safetensors")):
        return hf.load(path, dtype=dtype, shardings=shardings(hf.read_config(path)) if mesh_config else None)
    placed = None  # the config is read first only to place the arrays (load_params reads it again)
    if mesh_config is not None:
        config = ckpt.read_model_config(path)
        if config.lora_rank and jax.process_count() > 1:
            raise ckpt.CheckpointError(f"{path}: a LoRA workdir loads in one process only; export "
                                       "it (jsmaug export --ckpt_dir ... --out_dir HF) and sample from the export")
        placed = None if config.lora_rank else shardings(config)
    config, params = ckpt.load_params(path, shardings=placed)
    if dtype is not None:
        params = jax.tree.map(lambda x: x.astype(dtype), params)
        config = config.replace(param_dtype=dtype)
    return config, params


def model_tokenizer_path(model_path: str | Path) -> str | None:
    """The tokenizer a model folder carries (its tokenizer.json, else its tokenizer.model): in an HF folder or
    converter checkpoint, in `hf/` of a training workdir, or the one a workdir trained with. None when it has
    none (the caller then uses Mixtral's). `jsmaug.data.tokenizer_folder.model_tokenizer_path`."""
    from jsmaug.data import tokenizer_folder

    return tokenizer_folder.model_tokenizer_path(model_path)
