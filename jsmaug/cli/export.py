"""Orbax checkpoint (the converter's output, or a training workdir: its policy params) -> HF Mixtral folder.

    jsmaug export --ckpt_dir runs/tiny_dpop --out_dir export/tiny [--step N] [--dtype bfloat16]
                                      [--tokenizer FOLDER_OR_FILE | --no_tokenizer]

The export carries the tokenizer files, so transformers, TRL and lm-eval read it as jsmaug does: a
tokenizer.json tokenizer's files copied as they are (tokenizer.json, tokenizer_config.json,
special_tokens_map.json, chat_template.jinja, ...), or for a SentencePiece model what a Mixtral hub repository
ships (tokenizer.model, tokenizer.json, tokenizer_config.json, special_tokens_map.json). Without --tokenizer: a
training workdir's own (its config.json's data.tokenizer_path, else its init_from's tokenizer; and its
data.chat_template), a converter checkpoint's tokenizer files if it holds them, else Mixtral's
(mistral-common's tokenizer.model.v1).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
from pathlib import Path

from jsmaug import hf  # noqa: E402
from jsmaug.data import batches as data, formats as pair_formats, tokenizer_folder
from jsmaug.models.config import ConfigError  # noqa: E402
from jsmaug.train import checkpoint


def _tokenizer_of(ckpt_dir: str, given: str | None) -> tuple[str, str | None]:
    """(tokenizer path: a folder or file, chat template source or None) for the export."""
    folder = Path(ckpt_dir)
    run_config = folder / "config.json"
    if (folder / "checkpoints").is_dir() and run_config.is_file():  # a training workdir: what it trained with
        raw = json.loads(run_config.read_text())
        dcfg = raw.get("data") or {}
        tok = data.Tokenizer(given or tokenizer_folder.run_tokenizer_path(dcfg.get("tokenizer_path"),
                                                                          raw.get("init_from")))
        template = pair_formats.load_chat_template(dcfg.get("chat_template"), tok)
        return tok.path, template.source if template else None
    if given:
        return given, None
    return tokenizer_folder.model_tokenizer_path(folder) or data.default_tokenizer_path(), None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt_dir", required=True)
    ap.add_argument("--out_dir", required=True)
    ap.add_argument("--step", type=int, default=None, help="training checkpoint step (default: latest)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    ap.add_argument("--max_shard_size", default="5GB")
    ap.add_argument("--tokenizer", default=None, help="a tokenizer folder (tokenizer.json or tokenizer.model), or "
                    "one of those files (default: the checkpoint's own, else Mixtral's)")
    ap.add_argument("--no_tokenizer", action="store_true", help="write the weights and configs only")
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    try:
        hf.prepare_out_dir(Path(args.out_dir), args.overwrite)
        tokenizer, template = (None, None) if args.no_tokenizer else _tokenizer_of(args.ckpt_dir, args.tokenizer)
        hf.check_tokenizer_path(tokenizer)  # before minutes of tensor writing, not after
        vocab = checkpoint.read_model_config(args.ckpt_dir, args.step).vocab_size
        size = data.Tokenizer(tokenizer).vocab_size if tokenizer else 0
        if size > vocab:  # a vocabulary padded beyond the tokenizer's (Qwen's) is fine
            if args.tokenizer:
                raise ConfigError(f"--tokenizer {tokenizer}: {size} tokens, but the model's vocabulary has {vocab}")
            print(f"note: the model's vocabulary ({vocab}) is smaller than {tokenizer}'s ({size}); exporting "
                  "without tokenizer files "
                  "(pass --tokenizer)")
            tokenizer, template = None, None
        if tokenizer:
            print(f"tokenizer: {tokenizer}" + (" (with the run's chat template)" if template else ""))
        config, params = checkpoint.load_params(args.ckpt_dir, step=args.step)
        s = hf.save(args.out_dir, config, params, dtype=args.dtype, max_shard_size=args.max_shard_size,
                    tokenizer_path=tokenizer, overwrite=args.overwrite, progress=True, chat_template=template)
    except (hf.CheckpointError, checkpoint.CheckpointError, ConfigError, data.DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    print(f"exported {args.ckpt_dir} -> {args.out_dir}: {s['tensors']} tensors in {s['files']} file(s), "
          f"{s['bytes'] / 1e9:.3f} GB, {s['seconds']:.1f}s, peak RSS {peak_gb:.2f} GB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
