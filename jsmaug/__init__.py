"""jsmaug: sparse-MoE and dense decoders in JAX with DPOP (DPO-Positive) preference tuning, HF import/export.

Subpackages: `models` (the decoder, attention, MoE, LoRA, generation), `data` (pairs, tokenizers, packing),
`losses`, `parallel` (meshes, sharding, processes), `train` (the run: plan, step, checkpoints, eval),
`hf` (Hugging Face import and export), `perf` (FLOP and HLO counters, the bench runner), `cli` (the `jsmaug`
command). `from jsmaug import model` is the decoder (`jsmaug.models.decoder`), as before the folders.
"""

import importlib

from jsmaug.models.config import ConfigError, MixtralConfig, ModelConfig  # MixtralConfig: ModelConfig's former name

__version__ = "0.1.0"
__all__ = ["ModelConfig", "MixtralConfig", "ConfigError", "__version__"]

_ALIASES = {"model": "jsmaug.models.decoder"}


def __getattr__(name):
    if name in _ALIASES:
        return importlib.import_module(_ALIASES[name])
    raise AttributeError(f"module 'jsmaug' has no attribute {name!r}")
