"""The analytic memory of QLoRA DPOP on one device (docs/planning.md, "QLoRA"): the base's bytes in bfloat16 and
quantized, from `jax.eval_shape` of the preset's real shapes (nothing is allocated), the adapters with their
gradients and Adam moments, and the per-layer working set by formula.

    python tools/qlora_memory.py [--preset mixtral_8x7b] [--fmt nf4] [--group 64] [--rank 16] [--tokens 4096]
"""

from __future__ import annotations

import argparse
import math
import sys

import jax
import jax.numpy as jnp

from jsmaug.models import config as cfg_lib, decoder as model, lora, quant

GIB = 2**30


def nbytes(tree) -> int:
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="mixtral_8x7b")
    ap.add_argument("--fmt", default="nf4", choices=["int8", "nf4", "int4"])
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=4096, help="tokens per step (2 x 2048: one pair)")
    args = ap.parse_args(argv)
    config = cfg_lib.preset(args.preset).replace(param_dtype="bfloat16", dtype="bfloat16")
    shapes = model.param_shapes(config)
    base_bf16 = nbytes(shapes)
    try:
        base_q = nbytes(jax.eval_shape(lambda p: lora.quantize_base(p, args.fmt, args.group), shapes))
    except quant.QuantError as err:  # a group that does not divide some weight's contracted axis
        print(f"error: --preset {args.preset} --group {args.group}: {err}", file=sys.stderr)
        return 2
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "w1", "w3", "w2") if config.is_moe else \
        ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    adapters = lora.split(model.param_shapes(config.replace(lora_rank=args.rank, lora_targets=targets)))[1]
    n_ad = sum(math.prod(x.shape) for x in jax.tree.leaves(adapters))
    layers, d = config.num_hidden_layers, config.hidden_size
    embed = (1 if config.tie_word_embeddings else 2) * config.vocab_size * d * 2
    layer = (base_bf16 - embed) / layers  # one layer's weights in bfloat16 (norms and router included)
    width = config.intermediate_size * (config.num_experts_per_tok if config.is_moe else 1)
    rows = [("base, bfloat16", base_bf16), (f"base, projections in {args.fmt} (group {args.group})", base_q),
            (f"adapters r{args.rank} ({n_ad / 1e6:.1f}M) f32: weights, gradients, 2 Adam moments", 16 * n_ad),
            ("layer boundaries under remat: full (bfloat16)", layers * args.tokens * d * 2),
            ("one layer dequantized, forward recompute and backward", 2 * layer),
            # (no weight-sized gradient: LoRA is applied factored, jsmaug/models/factored.py)
            ("one layer's MLP intermediates and their gradients", 2 * 3 * args.tokens * width * 2)]
    for name, b in rows:
        print(f"{name:70s} {b / GIB:8.2f} GiB")
    total = sum(b for name, b in rows[1:])
    print(f"{'total with the quantized base (before attention, log-probs, XLA temporaries)':70s} {total / GIB:8.2f} GiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
