"""jsmaug: Mixtral sparse-MoE + DPOP (DPO-Positive) preference fine-tuning in JAX."""

from jsmaug.config import ConfigError, MixtralConfig

__version__ = "0.1.0"
__all__ = ["MixtralConfig", "ConfigError", "__version__"]
