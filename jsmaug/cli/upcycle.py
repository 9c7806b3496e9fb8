"""Dense HF checkpoint -> sparse-MoE HF Mixtral checkpoint (sparse upcycling), with the dense model's tokenizer.

    jsmaug upcycle --hf_dir /path/to/Llama-3.2-1B --out_dir ckpt/llama-1b-8x --experts 8 --top_k 2
    jsmaug convert --hf_dir ckpt/llama-1b-8x --out_dir ckpt/llama-1b-8x-jax     # then train it like any Mixtral

Every expert is a copy of the dense MLP, the router is random (--seed, --router_std) and the top-k weights are
renormalised, so the upcycled model starts with the dense model's log-probs. Takes llama and mistral
checkpoints; qwen2 (q/k/v biases), qwen3 (q/k norms) and models with attention biases are refused, since
MixtralForCausalLM has neither. A tied model stays tied (--untie writes lm_head as a copy of the embedding).
"""

from __future__ import annotations

import argparse
import resource
import sys

from jsmaug.errors import CheckpointError, ConfigError, DataError
from jsmaug.hf.upcycle import upcycle


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf_dir", required=True, help="the dense HF folder (config.json + safetensors)")
    ap.add_argument("--out_dir", required=True, help="the HF Mixtral folder to write")
    ap.add_argument("--experts", type=int, default=8, help="experts per layer (default 8)")
    ap.add_argument("--top_k", type=int, default=2, help="experts per token (default 2)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random routers (default 0)")
    ap.add_argument("--router_std", type=float, default=0.02,
                    help="standard deviation of the routers' normal init (default 0.02)")
    ap.add_argument("--untie", action="store_true", help="a tied model: write lm_head as a copy of embed_tokens")
    ap.add_argument("--max_shard_size", default="5GB")
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    try:
        s = upcycle(args.hf_dir, args.out_dir, num_experts=args.experts, top_k=args.top_k, seed=args.seed,
                    router_std=args.router_std, untie=args.untie, overwrite=args.overwrite,
                    max_shard_size=args.max_shard_size, progress=True)
    except (CheckpointError, ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    c, d = s["config"], s["dense_config"]
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    if s["untied"]:
        print("note: the dense model ties its embeddings; --untie wrote lm_head.weight as a copy of "
              "model.embed_tokens.weight (tie_word_embeddings: false), so the two now train apart")
    elif s["tied"]:
        print("note: tied embeddings stay tied (tie_word_embeddings: true; no lm_head.weight)")
    print(f"tokenizer files copied: {', '.join(s['copied']) or 'none (the dense folder has none)'}")
    print(f"upcycled {args.hf_dir} ({d.model_type}, {d.num_params() / 1e9:.3f}B) -> {args.out_dir} (mixtral, "
          f"{c.num_local_experts} experts top-{c.num_experts_per_tok}, {c.num_params() / 1e9:.3f}B parameters): "
          f"{s['tensors']} tensors in {s['files']} file(s), {s['bytes'] / 1e9:.2f} GB, {s['seconds']:.1f}s, "
          f"peak RSS {peak_gb:.2f} GB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
