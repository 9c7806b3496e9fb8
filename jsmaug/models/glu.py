"""The experts' gated activation h = act(gate pre-activation p1, up pre-activation p3), and its derivative for the
hand-written VJP of the bucketed MoE path (jsmaug/models/bucketed.py).

- SwiGLU (Mixtral, Qwen3-MoE, OLMoE): h = silu(p1) * p3.
- gpt-oss's clamped SwiGLU (HF `GptOssExperts`): g = min(p1, limit), u = clip(p3, -limit, limit),
  h = (u + 1) * g * sigmoid(alpha * g). The clamps pass no gradient outside [-limit, limit] (as torch's clamp,
  which passes it on the bounds themselves).

`Glu` is static (hashable): it travels as an argument of the MoE paths, not as data.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


def silu_grad(z):
    """silu'(z) = sig(z) (1 + z (1 - sig(z)))."""
    sig = jax.nn.sigmoid(z)
    return sig * (1 + z * (1 - sig))


@dataclasses.dataclass(frozen=True)
class Glu:
    limit: float | None = None  # None: plain SwiGLU; a float: gpt-oss's clamped form with this limit
    alpha: float = 1.702

    def __call__(self, p1, p3):
        if self.limit is None:
            return jax.nn.silu(p1) * p3
        g, u = self._clamped(p1, p3)
        return (u + 1) * g * jax.nn.sigmoid(self.alpha * g)

    def _clamped(self, p1, p3):
        return jnp.minimum(p1, self.limit), jnp.clip(p3, -self.limit, self.limit)

    def grads(self, p1, p3, dh):
        """(dp1, dp3) from dh = dL/dh."""
        if self.limit is None:
            return dh * p3 * silu_grad(p1), dh * jax.nn.silu(p1)
        g, u = self._clamped(p1, p3)
        sig = jax.nn.sigmoid(self.alpha * g)
        glu = g * sig
        dglu = sig * (1 + self.alpha * g * (1 - sig))
        dp1 = jnp.where(p1 <= self.limit, dh * (u + 1) * dglu, 0)
        dp3 = jnp.where(jnp.abs(p3) <= self.limit, dh * glu, 0)
        return dp1.astype(p1.dtype), dp3.astype(p3.dtype)


SWIGLU = Glu()
