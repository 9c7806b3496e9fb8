"""Orbax checkpoint (the converter's output, or a training workdir: its policy params) -> HF Mixtral folder.

    python tools/convert_jax_to_hf.py --ckpt_dir runs/tiny_dpop --out_dir export/tiny [--step N] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import resource
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jsmaug import checkpoint, hf  # noqa: E402
from jsmaug.config import ConfigError  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt_dir", required=True)
    ap.add_argument("--out_dir", required=True)
    ap.add_argument("--step", type=int, default=None, help="training checkpoint step (default: latest)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    ap.add_argument("--max_shard_size", default="5GB")
    ap.add_argument("--tokenizer", default=None, help="a SentencePiece tokenizer.model: the export then carries "
                    "tokenizer.model, tokenizer.json, tokenizer_config.json and special_tokens_map.json")
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    try:
        hf.prepare_out_dir(Path(args.out_dir), args.overwrite)
        hf.check_tokenizer_path(args.tokenizer)  # before minutes of tensor writing, not after
        config, params = checkpoint.load_params(args.ckpt_dir, step=args.step)
        s = hf.save(args.out_dir, config, params, dtype=args.dtype, max_shard_size=args.max_shard_size,
                    tokenizer_path=args.tokenizer, overwrite=args.overwrite, progress=True)
    except (hf.CheckpointError, checkpoint.CheckpointError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    print(f"exported {args.ckpt_dir} -> {args.out_dir}: {s['tensors']} tensors in {s['files']} file(s), "
          f"{s['bytes'] / 1e9:.3f} GB, {s['seconds']:.1f}s, peak RSS {peak_gb:.2f} GB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
