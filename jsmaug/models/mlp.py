"""The feed-forward half of a decoder layer: a dense SwiGLU MLP (Llama, Mistral, Qwen2/3, Qwen3-MoE's dense
layers; GeGLU for Gemma 3) or the sparse MoE block (Mixtral, Qwen3-MoE, OLMoE): router, top-k, SwiGLU experts.

Array names carry their shapes: B batch, S sequence, T = B * S tokens, D hidden, F mlp width, E experts,
K experts per token.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from jsmaug.models import moe
from jsmaug.models.config import ModelConfig
from jsmaug.models.weights import normal, param, weight
from jsmaug.parallel import expert_parallel


def activation(name: str):
    """The gate activation by HF's name: SwiGLU's silu, or GeGLU's tanh-approximated GELU (Gemma)."""
    if name == "gelu_pytorch_tanh":
        return functools.partial(jax.nn.gelu, approximate=True)
    return jax.nn.silu


class DenseMLP(nn.Module):
    """HF's `LlamaMLP`: down_proj(act(gate_proj x) * up_proj x), no biases; act = silu (SwiGLU) or, for Gemma,
    gelu_pytorch_tanh (GeGLU)."""
    config: ModelConfig

    @nn.compact
    def __call__(self, x_BxSxD):
        c = self.config
        dtype = jnp.dtype(c.dtype)
        d, f = c.hidden_size, c.intermediate_size
        gate_DxF = weight(self, "gate_proj", (d, f), ("embed", "mlp"), c)
        up_DxF = weight(self, "up_proj", (d, f), ("embed", "mlp"), c)
        down_FxD = weight(self, "down_proj", (f, d), ("mlp", "embed"), c)
        x = x_BxSxD.astype(dtype)
        h_BxSxF = activation(c.hidden_act)(x @ gate_DxF) * (x @ up_DxF)
        return h_BxSxF @ down_FxD


class SparseMoE(nn.Module):
    """The router `gate` (D, E) and the stacked experts w1 (gate), w3 (up), w2 (down). Returns the output and
    the load-balancing statistics of the unpadded tokens."""
    config: ModelConfig

    @nn.compact
    def __call__(self, x_BxSxD, token_mask_BxS):
        c = self.config
        dtype = jnp.dtype(c.dtype)
        d, f, e = c.hidden_size, c.expert_intermediate_size, c.num_local_experts
        gate = param(self, "gate", (d, e), ("embed", "exp"), normal(c), c)
        w1 = weight(self, "w1", (e, d, f), ("exp", "embed", "mlp"), c)
        w3 = weight(self, "w3", (e, d, f), ("exp", "embed", "mlp"), c)
        w2 = weight(self, "w2", (e, f, d), ("exp", "mlp", "embed"), c)
        b, s, _ = x_BxSxD.shape
        x_TxD = x_BxSxD.reshape(b * s, d).astype(dtype)
        # Router in float32 (its softmax decides which experts run: keep it exact).
        logits_TxE = x_TxD.astype(jnp.float32) @ gate.astype(jnp.float32)
        probs_TxE, idx_TxK, w_TxK = moe.route(logits_TxE, c.num_experts_per_tok, renormalize=c.norm_topk_prob)
        # The experts in the compute dtype before any dispatch: a gathered (or all_to_all-side) copy of bf16
        # weights is half the bytes of the float32 master weights.
        y_TxD, dropped = expert_parallel.expert_ffn(
            x_TxD, idx_TxK, w_TxK.astype(dtype), w1.astype(dtype), w3.astype(dtype), w2.astype(dtype),
            dispatch=c.moe_dispatch, impl=c.moe_impl, block_size=c.moe_block_size,
            capacity_factor=c.moe_capacity_factor)
        # Load-balancing statistics over unpadded tokens (HF's load_balancing_loss_func with an attention mask).
        valid_T = token_mask_BxS.reshape(-1).astype(jnp.float32)
        counts_E = jnp.sum(jax.nn.one_hot(idx_TxK, e, dtype=jnp.float32) * valid_T[:, None, None], axis=(0, 1))
        prob_sums_E = jnp.sum(probs_TxE * valid_T[:, None], axis=0)
        stats = {"counts": counts_E, "prob_sums": prob_sums_E, "dropped": dropped}
        return y_TxD.reshape(b, s, d), stats
