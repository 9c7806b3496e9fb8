"""The analytic FLOP count of a train step (MaxText's formula): what MFU and the planner's compiled-vs-analytic
ratio are measured against."""


def analytic_flops_per_step(c, tokens: int, seq: int, with_reference: bool, remat_layers: bool = False) -> float:
    """MaxText's training-FLOPs count (calculate_tflops_training_per_device), for the whole step.

    Per token: router 2*D*E, experts 3 matmuls * 2*D*F * k, qkv 2*D*(Hq+2Hkv)*Dh, out 2*D*Hq*Dh, attention
    4*S*Hq*Dh halved for causal, embedding/unembedding 2*D*V; training = 3x forward. The frozen reference adds
    one forward (1x) over the same tokens. `remat_layers` (remat: full) adds the layers' forward once more, the
    work the backward pass recomputes: MaxText's count leaves it out, the compiled program does not.
    """
    d, e, k = c.hidden_size, c.num_local_experts, c.num_experts_per_tok
    hq, hkv, dh, v = c.num_attention_heads, c.num_key_value_heads, c.resolved_head_dim, c.vocab_size
    attention = 2 * d * (hq + 2 * hkv) * dh + 2 * d * hq * dh + 4 * seq * hq * dh / 2
    # A sparse layer: router + k experts of the experts' width (qwen3_moe: moe_intermediate_size); a dense
    # layer (a dense family, or qwen3_moe's mlp_only_layers): the dense MLP of intermediate_size.
    sparse = 2 * d * e + 3 * 2 * d * c.expert_intermediate_size * k
    dense = 3 * 2 * d * c.intermediate_size
    layers = sum(attention + (sparse if s else dense) for s in c.sparse_layers)
    fwd = tokens * (layers + 2 * d * v)
    return fwd * (3 + (1 if with_reference else 0)) + (tokens * layers if remat_layers else 0)
