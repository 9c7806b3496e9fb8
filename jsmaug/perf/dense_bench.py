"""The dense-model row of the CPU benchmark: jsmaug's planned DPOP step on a Llama-shaped model against HF
transformers' LlamaForCausalLM + the same DPOP loss in PyTorch, same batch, side by side (`tools/bench.py`)."""

from __future__ import annotations

import numpy as np

from jsmaug.models import config as cfg_lib, decoder as model
from jsmaug.perf.bench import StepRunner, record_against_torch, synthetic_batch, torch_dpop_step


def llama_config(quick: bool = False):
    """A Llama-shaped dense model of about the step model's size (20.3M parameters; tiny with `quick`)."""
    return cfg_lib.tiny(model_type="llama", vocab_size=512 if quick else 32000, hidden_size=64 if quick else 256,
                        intermediate_size=128 if quick else 1024, num_hidden_layers=2 if quick else 4,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                        rope_theta=500000.0, tie_word_embeddings=False, router_aux_loss_coef=0.0)


def bench_llama_vs_torch(quick: bool, threads: int, rounds: int = 4) -> None:
    import jax
    import torch

    torch.set_num_threads(threads)
    config = llama_config(quick)
    pairs, length = (2, 32) if quick else (4, 256)
    batch = synthetic_batch(np.random.default_rng(0), pairs, length, config.vocab_size)
    ref = model.init_params(config, jax.random.key(1))
    jax_step = StepRunner(config, "dpop", batch, ref)
    torch_step = torch_dpop_step(config, batch, pairs)
    torch_step()
    tokens = 2 * pairs * length
    record_against_torch("torch/llama_jsmaug_vs_pytorch_dpop_step", jax_step, torch_step, tokens,
                         f"llama {config.num_params() / 1e6:.1f}M params, {pairs} pairs x {length}, {threads} threads",
                         "HF LlamaForCausalLM + PyTorch DPOP step", rounds)


def on_both_step_models(measure, quick: bool, json_out: str | None, with_torch: bool = True) -> dict:
    """`measure(kind, config)` on the MoE step model and on the dense one (tiny with `quick`), each result printed as
    one JSON line, all of them written whole to `json_out` ({"moe": ..., "dense": ...}): the side-by-side benches'
    (unroll_bench, unstacked_bench) main loop. `with_torch`: PyTorch on as many threads as the machine's CPUs."""
    import json
    import os

    from jsmaug import paths
    from jsmaug.perf.bench import step_model_config

    if with_torch:
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
    out = {}
    for kind, config in (("moe", step_model_config(quick)), ("dense", llama_config(quick))):
        out[kind] = measure(kind, config)
        print(kind, json.dumps(out[kind]), flush=True)
    if json_out:
        paths.atomic_write(json_out, json.dumps(out, indent=1))
    return out
