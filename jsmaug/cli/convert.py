"""HF Mixtral folder -> Orbax checkpoint (params + model config) that training can start from (`init_from`).

    jsmaug convert --hf_dir /path/to/Mixtral-8x7B-v0.1 --out_dir ckpt/mixtral [--dtype bfloat16] [--base_model ID]

The checkpoint also gets the HF folder's tokenizer files, copied as they are (tokenizer.json, tokenizer.model,
tokenizer_config.json, special_tokens_map.json, chat_template.jinja, generation_config.json, ... when present):
a run from it (`init_from`) with `data.tokenizer_path: null` uses that tokenizer and its chat template. A
tokenizer file that cannot be read stops the conversion before anything is written.

It also records its source in `source.json`, for the model card of every model trained from it: the folder, its
Hub id (--base_model, else read from a Hub-cache path `models--ORG--NAME/snapshots/...` or config.json's
`_name_or_path`; null when only the path is known) and the license of the folder's README.md.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import time
from pathlib import Path

from jsmaug import hf  # noqa: E402
from jsmaug.data import tokenizer_folder
from jsmaug.data.files import DataError
from jsmaug.data.tokenizer import Tokenizer
from jsmaug.eval import card
from jsmaug.models.config import ConfigError  # noqa: E402
from jsmaug.train import checkpoint


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf_dir", required=True)
    ap.add_argument("--out_dir", required=True)
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                    help="parameter dtype to store (default: the checkpoint's own)")
    ap.add_argument("--base_model", default=None, help="the folder's Hub id, for model cards (default: read from "
                    "a Hub-cache path or config.json's _name_or_path)")
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    out = Path(args.out_dir)
    t0 = time.time()
    try:
        card.check_hub_id(args.base_model)  # before minutes of reading
        hf.prepare_out_dir(out, args.overwrite)
        has_tokenizer = tokenizer_folder.has_tokenizer_files(args.hf_dir)
        if has_tokenizer:
            tok = Tokenizer(args.hf_dir)  # a bad tokenizer file is named before anything is written
        config, params = hf.load(args.hf_dir, dtype=args.dtype, progress=True)
        tmp = out.with_name(f".{out.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            checkpoint.save_params(tmp, config, params)
            copied = tokenizer_folder.copy_tokenizer_files(args.hf_dir, tmp, tokenizer_folder.CHECKPOINT_FILES)
            source = card.source_metadata(args.hf_dir, args.base_model)
            (tmp / card.SOURCE_FILE).write_text(json.dumps(source, indent=2))
            hf.commit_dir(tmp, out)  # renames only: an existing out_dir is replaced, never half-written
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    except (hf.CheckpointError, ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    if has_tokenizer:
        print(f"tokenizer: {tok.path} ({tok.kind}, {tok.vocab_size} tokens); copied {', '.join(copied)}")
    else:
        print(f"note: {args.hf_dir} has no tokenizer.json or tokenizer.model; a run from {out} uses "
              "data.tokenizer_path, else Mixtral's tokenizer")
    print(f"source: {source['base_model'] or 'no Hub id known (pass --base_model)'}"
          + (f", license {source['license']}" if source.get("license") else ""))
    print(f"converted {args.hf_dir} -> {out}: {config.num_params() / 1e9:.3f}B parameters ({config.param_dtype}), "
          f"{time.time() - t0:.1f}s, peak RSS {peak_gb:.2f} GB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
