"""Tiny random checkpoints of every supported HF family, made by transformers (test-only dependency).

Each case switches on what its family adds: biases (random, so they matter), q/k norms (non-trivial weights),
RoPE scaling, a sliding window shorter than the test sequences, tied embeddings, 16 experts with top-4 and
dense layers between sparse ones, Gemma 3's local and global layers. Router weights are scaled up so that top-k
choices are clear-cut (a near tie could flip on float32 round-off and make two correct implementations
disagree), and q/k weights so that attention is sharp enough for the RoPE variant to show in the logits (Gemma's
q/k norms undo that scaling; its RoPE differences still show, tests/test_gemma3.py checks them).
"""

from __future__ import annotations

import json
from pathlib import Path

_BASE = dict(vocab_size=96, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)
_MOE = dict(num_experts=16, num_experts_per_tok=4)

# name: (transformers config class, overrides, what the case checks)
CASES = {
    "llama3_tied": ("LlamaConfig", dict(
        attention_bias=True, tie_word_embeddings=True,
        rope_parameters=dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=64)),
        "llama3 RoPE scaling (all three bands), biases on q/k/v/o, tied embeddings"),
    "llama_linear_legacy": ("LlamaConfig", dict(
        rope_parameters=dict(rope_type="linear", rope_theta=500.0, factor=4.0)),
        "linear RoPE scaling read from the older rope_theta + rope_scaling form"),
    "mistral_window": ("MistralConfig", dict(sliding_window=5, head_dim=16),
                       "sliding window 5 < sequence, explicit head_dim"),
    "qwen2_bias": ("Qwen2Config", dict(), "q/k/v biases, no o bias"),
    "qwen3_qknorm": ("Qwen3Config", dict(head_dim=16), "q/k RMSNorm per head, head_dim != hidden / heads"),
    "qwen3_moe_mixed": ("Qwen3MoeConfig", dict(
        _MOE, num_hidden_layers=4, mlp_only_layers=[2], moe_intermediate_size=16, norm_topk_prob=True,
        head_dim=8, router_aux_loss_coef=0.001),
        "16 experts top-4 renormalised, dense layer 2 between sparse ones, q/k norm per head"),
    "olmoe": ("OlmoeConfig", dict(_MOE, intermediate_size=16, norm_topk_prob=False, clip_qkv=0.6,
                                  router_aux_loss_coef=0.01),
              "16 experts top-4 not renormalised, q/k norm over the projection, clip_qkv"),
    "gemma3_local_global": ("Gemma3TextConfig", dict(
        num_hidden_layers=4, head_dim=16, query_pre_attn_scalar=24, sliding_window=5, attention_bias=True,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        tie_word_embeddings=True, rms_norm_eps=1e-6,
        rope_parameters=dict(full_attention=dict(rope_type="linear", rope_theta=10000.0, factor=2.0),
                             sliding_attention=dict(rope_type="default", rope_theta=100.0))),
        "Gemma 3: (1 + w) norms, four per layer, GeGLU, q/k norms, query_pre_attn_scalar != head_dim, the embedding "
        "times sqrt(hidden), local layers (window 5 < sequence, their own RoPE base) around a global one (linear "
        "RoPE), biases, tied"),
}
MOE_CASES = ("qwen3_moe_mixed", "olmoe")


def make_checkpoint(name: str, path: Path, seed: int = 0):
    """Saves case `name` with save_pretrained into `path`; returns the torch model (eval, float32, eager)."""
    import torch
    import transformers

    cls, overrides, _ = CASES[name]
    torch.manual_seed(seed)
    cfg = getattr(transformers, cls)(**dict(_BASE, **overrides))
    cfg._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight"):  # a transposed, skipped or misplaced norm shows up
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif pname.endswith(".bias"):  # HF initialises biases to 0: make them count
                p.copy_(0.1 * torch.randn_like(p))
            elif pname.endswith("mlp.gate.weight"):  # clear-cut routing
                p.mul_(40.0)
            elif pname.endswith(("q_proj.weight", "k_proj.weight")):  # sharp attention: positions (RoPE) matter
                p.mul_(10.0)
    model.save_pretrained(path)
    if name == "llama_linear_legacy":  # the hub's older config.json form
        d = json.loads((path / "config.json").read_text())
        rp = d.pop("rope_parameters")
        d["rope_theta"] = rp["rope_theta"]
        d["rope_scaling"] = {"type": "linear", "factor": rp["factor"]}
        (path / "config.json").write_text(json.dumps(d))
    return model


def hf_logits(model, input_ids, attention_mask=None, output_router_logits=False):
    """(float32 logits, aux loss or None) of a torch model."""
    import numpy as np
    import torch

    kw = {"output_router_logits": True} if output_router_logits else {}
    with torch.no_grad():
        out = model(torch.as_tensor(np.asarray(input_ids)),
                    attention_mask=None if attention_mask is None else torch.as_tensor(np.asarray(attention_mask)),
                    **kw)
    aux = getattr(out, "aux_loss", None)
    return out.logits.float().numpy(), None if aux is None else float(aux)


def assert_grads_equal_torch(tmp_path: Path, torch_model, config, params, ids, mask) -> dict:
    """d(sum of the masked label log-probs)/d(every weight) of jsmaug's forward against torch's autograd through
    `torch_model` (the same weights): jsmaug's gradient tree is exported with hf.save, so each tensor is compared
    under its HF name (a tied embedding's gradient is the sum of both uses on both sides), each within 1e-4 of its
    largest entry. Returns torch's gradients by name."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from safetensors.numpy import load_file

    from jsmaug import hf
    from jsmaug.models import decoder as model

    def loss(p):
        logits = model.forward(config, p, ids, mask)[0]
        lp = (jax.nn.log_softmax(logits[:, :-1]) * jax.nn.one_hot(ids[:, 1:], logits.shape[-1])).sum(-1)
        return jnp.sum(lp * mask[:, 1:])

    hf.save(tmp_path / "grads", config, jax.jit(jax.grad(loss))(params))
    got = load_file(str(tmp_path / "grads/model.safetensors"))
    torch_model.zero_grad()
    out = torch_model(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask)).logits
    lp = torch.log_softmax(out[:, :-1], -1).gather(-1, torch.as_tensor(ids[:, 1:, None]))[..., 0]
    (lp * torch.as_tensor(mask[:, 1:])).sum().backward()
    want = {n: p.grad.numpy() for n, p in torch_model.named_parameters()}
    assert set(got) == set(want)
    for name, g in want.items():
        scale = max(float(np.abs(g).max()), 1e-3)
        np.testing.assert_allclose(got[name], g, atol=1e-4 * scale, rtol=0, err_msg=name)
    return want
