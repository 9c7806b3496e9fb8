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
from jsmaug.models.glu import SWIGLU, Glu, silu_grad
from jsmaug.models.weights import bias, normal, param, weight
from jsmaug.parallel import expert_parallel


def activation(name: str):
    """The gate activation by HF's name: SwiGLU's silu, or GeGLU's tanh-approximated GELU (Gemma)."""
    if name == "gelu_pytorch_tanh":
        return functools.partial(jax.nn.gelu, approximate=True)
    return jax.nn.silu


_GELU_C = 0.7978845608028654  # sqrt(2 / pi)


def _act_grad(name: str, p):
    """act'(p) of the gate activation `activation(name)`."""
    if name == "gelu_pytorch_tanh":  # d/dp 0.5 p (1 + tanh(c (p + 0.044715 p^3)))
        t = jnp.tanh(_GELU_C * (p + 0.044715 * p * p * p))
        return 0.5 * (1 + t) + 0.5 * p * (1 - t * t) * _GELU_C * (1 + 3 * 0.044715 * p * p)
    return silu_grad(p)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def gated(name: str, gate_pre, up_pre):
    """act(gate_pre) * up_pre with a hand-written backward that keeps only the two pre-activations. Autodiff of
    the tanh GELU keeps six (tokens x F) intermediates per layer and, on CPU, wrote their gradient out transposed in
    one strided pass: on Gemma 3 270M's step, 2.4 of its 13.8 s (docs/performance.md, "Gemma 3 ... alone")."""
    return activation(name)(gate_pre) * up_pre


def _gated_fwd(name, gate_pre, up_pre):
    return gated(name, gate_pre, up_pre), (gate_pre, up_pre)


def _gated_bwd(name, res, dh):
    gate_pre, up_pre = res
    p = gate_pre.astype(jnp.float32)
    act, dact = activation(name)(p), _act_grad(name, p)
    dh32 = dh.astype(jnp.float32)
    return (dh32 * up_pre.astype(jnp.float32) * dact).astype(gate_pre.dtype), (dh32 * act).astype(up_pre.dtype)


gated.defvjp(_gated_fwd, _gated_bwd)


class DenseMLP(nn.Module):
    """HF's `LlamaMLP`: down_proj(act(gate_proj x) * up_proj x), no biases; act = silu (SwiGLU) or, for Gemma,
    gelu_pytorch_tanh (GeGLU)."""
    config: ModelConfig

    @nn.compact
    def __call__(self, x_BxSxD):
        c = self.config
        dtype = jnp.dtype(c.dtype)
        d, f = c.hidden_size, c.intermediate_size
        # LoRA factored (jsmaug/models/factored.py): `x @ w` is x @ W + s (x @ A) @ B.
        gate_DxF = weight(self, "gate_proj", (d, f), ("embed", "mlp"), c, factor=True)
        up_DxF = weight(self, "up_proj", (d, f), ("embed", "mlp"), c, factor=True)
        down_FxD = weight(self, "down_proj", (f, d), ("mlp", "embed"), c, factor=True)
        x = x_BxSxD.astype(dtype)
        h_BxSxF = gated(c.hidden_act, x @ gate_DxF, x @ up_DxF)
        return h_BxSxF @ down_FxD


class SparseMoE(nn.Module):
    """The router `gate` (D, E) and the stacked experts w1 (gate), w3 (up), w2 (down); gpt-oss adds the router's
    bias `gate_bias`, the experts' biases `w1_bias`, `w3_bias` (E, F) and `w2_bias` (E, D) and its clamped SwiGLU
    (jsmaug/models/glu.py). Returns the output and the load-balancing statistics of the unpadded tokens."""
    config: ModelConfig

    @nn.compact
    def __call__(self, x_BxSxD, token_mask_BxS):
        c = self.config
        dtype = jnp.dtype(c.dtype)
        d, f, e = c.hidden_size, c.expert_intermediate_size, c.num_local_experts
        gate = param(self, "gate", (d, e), ("embed", "exp"), normal(c), c)
        # With LoRA, `factored.Factored` weights: every dispatch path applies the adapters factored.
        w1 = weight(self, "w1", (e, d, f), ("exp", "embed", "mlp"), c, factor=True)
        w3 = weight(self, "w3", (e, d, f), ("exp", "embed", "mlp"), c, factor=True)
        w2 = weight(self, "w2", (e, f, d), ("exp", "mlp", "embed"), c, factor=True)
        b, s, _ = x_BxSxD.shape
        x_TxD = x_BxSxD.reshape(b * s, d).astype(dtype)
        # Router in float32 (its softmax decides which experts run: keep it exact).
        logits_TxE = x_TxD.astype(jnp.float32) @ gate.astype(jnp.float32)
        if c.router_bias:  # gpt-oss: softmax over the top-k biased logits == top-k of the softmax, renormalised
            logits_TxE = logits_TxE + param(self, "gate_bias", (e,), ("exp",), nn.initializers.zeros, c).astype(
                jnp.float32)
        probs_TxE, idx_TxK, w_TxK = moe.route(logits_TxE, c.num_experts_per_tok, renormalize=c.norm_topk_prob)
        b13 = None
        if c.expert_bias:
            b13 = tuple(bias(self, n, (e, f), ("exp", "mlp"), c) for n in ("w1_bias", "w3_bias"))
        glu = Glu(c.swiglu_limit, c.swiglu_alpha) if c.swiglu_limit is not None else SWIGLU
        # The experts in the compute dtype before any dispatch: a gathered (or all_to_all-side) copy of bf16
        # weights is half the bytes of the float32 master weights.
        y_TxD, dropped = expert_parallel.expert_ffn(
            x_TxD, idx_TxK, w_TxK.astype(dtype), w1.astype(dtype), w3.astype(dtype), w2.astype(dtype),
            dispatch=c.moe_dispatch, impl=c.moe_impl, block_size=c.moe_block_size,
            capacity_factor=c.moe_capacity_factor, token_chunks=c.moe_token_chunks, glu=glu, b13=b13)
        if c.expert_bias:  # sum_k g_k (h_k w2[e_k] + b2[e_k]): the bias part here, outside any dispatch (whose
            # tensor-split partial sums would add it once per shard)
            b2_ExD = bias(self, "w2_bias", (e, d), ("exp", "embed"), c)
            y_TxD = y_TxD + jnp.einsum("tk,tkd->td", w_TxK.astype(dtype), b2_ExD[idx_TxK])
        # Load-balancing statistics over unpadded tokens (HF's load_balancing_loss_func with an attention mask).
        valid_T = token_mask_BxS.reshape(-1).astype(jnp.float32)
        counts_E = jnp.sum(jax.nn.one_hot(idx_TxK, e, dtype=jnp.float32) * valid_T[:, None, None], axis=(0, 1))
        prob_sums_E = jnp.sum(probs_TxE * valid_T[:, None], axis=0)
        stats = {"counts": counts_E, "prob_sums": prob_sums_E, "dropped": dropped}
        return y_TxD.reshape(b, s, d), stats
