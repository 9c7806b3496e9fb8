"""How a layer declares its weights: logical axis names on every parameter (the sharding rules map them to a
mesh, jsmaug/parallel/sharding.py), the config's parameter dtype, and LoRA adapters on the targeted ones."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jsmaug.models import factored, lora, quant
from jsmaug.models.config import ModelConfig


def param(module: nn.Module, name: str, shape, axes, init, config: ModelConfig):
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.dtype(config.param_dtype))


def normal(config: ModelConfig):
    return nn.initializers.normal(stddev=config.initializer_range)


def weight(module: nn.Module, name: str, shape, axes, config: ModelConfig, factor: bool = False):
    """A weight in the compute dtype; with LoRA on it, W + alpha / rank * A @ B (jsmaug/models/lora.py), or with
    `factor` (the MLP and the experts, whose callers take one) a `factored.Factored` that applies the adapter as
    x @ W + s (x @ A) @ B without forming the sum or its weight-sized gradient; its base is frozen (stop-gradient).
    A base stored quantized (QLoRA, `lora.quantize_base`) is dequantized here, one layer at a time under the layer
    scan."""
    dtype = jnp.dtype(config.dtype)
    stored = module.get_variable("params", name) if module.has_variable("params", name) else None
    if quant.is_quantized(stored):  # read directly: flax's `param` would compare the packed leaves to `shape`
        if stored.shape != tuple(shape):
            raise ValueError(f"{module.path}/{name}: quantized weight of shape {stored.shape}, the layer wants "
                             f"{tuple(shape)}")
        w = stored.dequantize(dtype)
    else:
        w = param(module, name, shape, axes, normal(config), config).astype(dtype)
    if not config.lora_rank or not lora.is_target(name, config.lora_targets):
        return w
    a_shape, a_axes, b_shape, b_axes = lora.factor_shapes(name, shape, axes, config.lora_rank)
    a = param(module, name + "_lora_a", a_shape, a_axes, lora.a_init(name), config)
    b = param(module, name + "_lora_b", b_shape, b_axes, nn.initializers.zeros, config)
    scale = config.lora_alpha / config.lora_rank
    if factor:
        return factored.Factored(jax.lax.stop_gradient(w), a.astype(dtype), b.astype(dtype), scale)
    return w + (scale * lora.delta(name, a.astype(jnp.float32), b.astype(jnp.float32))).astype(dtype)


def bias(module: nn.Module, name: str, shape, axes, config: ModelConfig):
    """A bias (zeros at init, as HF's Linear biases after its init), in the compute dtype."""
    return param(module, name, shape, axes, nn.initializers.zeros, config).astype(jnp.dtype(config.dtype))


def rms_norm(x, weight_, eps: float, num_axes: int = 1, offset: float = 0.0, weight_in_float32: bool = False):
    """RMSNorm over the last `num_axes` axes in float32. Llama's form: cast back to x's dtype, then times the
    weight. With `weight_in_float32` (`config.norm_weight_in_float32`): times (offset + weight) still in float32,
    then cast, as HF's Gemma3RMSNorm (offset 1) and GptOssRMSNorm (offset 0) do."""
    xf = x.astype(jnp.float32)
    axes = tuple(range(-num_axes, 0))
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=axes, keepdims=True) + eps)
    if offset or weight_in_float32:
        return (y * (offset + weight_.astype(jnp.float32))).astype(x.dtype)
    return y.astype(x.dtype) * weight_.astype(x.dtype)


class RMSNorm(nn.Module):
    """RMSNorm with a weight of `shape` (default: the last axis of x) over as many trailing axes of x."""
    config: ModelConfig
    shape: tuple[int, ...] | None = None
    axes: tuple[str, ...] = ("embed",)

    @nn.compact
    def __call__(self, x):
        shape = self.shape or (x.shape[-1],)
        offset = self.config.norm_offset  # Gemma stores w around 0 and applies (1 + w): identity at init
        init = nn.initializers.zeros if offset else nn.initializers.ones
        w = param(self, "weight", shape, self.axes, init, self.config)
        return rms_norm(x, w, self.config.rms_norm_eps, len(shape), offset, self.config.norm_weight_in_float32)
