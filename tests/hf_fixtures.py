"""Builds tiny random HF MixtralForCausalLM checkpoints with transformers (test-only dependency)."""

from __future__ import annotations

from pathlib import Path


def hf_config(**kw):
    from transformers import MixtralConfig as HFConfig

    base = dict(vocab_size=96, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=128,
                rope_theta=1e6, router_aux_loss_coef=0.02, tie_word_embeddings=False)
    base.update(kw)
    return HFConfig(**base)


def make_hf_checkpoint(path: Path, seed: int = 0, max_shard_size=None, dtype="float32", **kw):
    """Saves a random tiny Mixtral with save_pretrained; returns the torch model (eval mode, float32)."""
    import torch
    from transformers import MixtralForCausalLM

    torch.manual_seed(seed)
    cfg = hf_config(**kw)
    cfg._attn_implementation = "eager"
    model = MixtralForCausalLM(cfg).eval()
    # Non-trivial norms so a transposed or skipped norm weight shows up.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    save_kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    if dtype == "bfloat16":
        model.to(torch.bfloat16).save_pretrained(path, **save_kw)
        model.to(torch.float32)
    else:
        model.save_pretrained(path, **save_kw)
    return model


def hf_forward(model, input_ids, attention_mask=None):
    import numpy as np
    import torch

    with torch.no_grad():
        out = model(torch.as_tensor(np.asarray(input_ids)),
                    attention_mask=None if attention_mask is None else torch.as_tensor(np.asarray(attention_mask)),
                    output_router_logits=True)
    return out.logits.float().numpy(), float(out.aux_loss)
