"""HF Mixtral folder -> Orbax checkpoint (params + model config) that training can start from (`init_from`).

    jsmaug convert --hf_dir /path/to/Mixtral-8x7B-v0.1 --out_dir ckpt/mixtral [--dtype bfloat16] [--base_model ID]
                   [--quantize {nf4,int8,int4} [--quant_group 64]]

--quantize stores a QLoRA run's frozen base: the projections and the embedding tables packed in that format
(bit-identical to `lora.quantize_base` of the unquantized conversion), quantized one layer at a time as they are
read, so host memory holds one layer's float tensors and the packed model; `quantization.json` records the format
and group. Only a QLoRA run with the same lora.base_quant / lora.base_quant_group starts from it (docs/conversion.md).

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

import jax

from jsmaug import hf  # noqa: E402
from jsmaug.data import tokenizer_folder
from jsmaug.data.files import DataError
from jsmaug.data.tokenizer import Tokenizer
from jsmaug.eval import card
from jsmaug.models.config import ConfigError  # noqa: E402
from jsmaug.models import quant
from jsmaug.train import checkpoint, quantized_base


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf_dir", required=True)
    ap.add_argument("--out_dir", required=True)
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                    help="parameter dtype to store (default: the checkpoint's own)")
    ap.add_argument("--base_model", default=None, help="the folder's Hub id, for model cards (default: read from "
                    "a Hub-cache path or config.json's _name_or_path)")
    ap.add_argument("--quantize", choices=list(quant.FORMATS), default=None,
                    help="store the projections and embedding tables quantized: a frozen QLoRA base")
    ap.add_argument("--quant_group", type=int, default=quant.DEFAULT_GROUP,
                    help="nf4 / int4: values per scale along each weight's contracted axis (default 64)")
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    if args.quantize and args.quantize != "int8" and (args.quant_group < 2 or args.quant_group % 2):
        ap.error(f"--quant_group must be an even number >= 2, got {args.quant_group}")
    out = Path(args.out_dir)
    t0 = time.time()
    try:
        card.check_hub_id(args.base_model)  # before minutes of reading
        hf.prepare_out_dir(out, args.overwrite)
        has_tokenizer = tokenizer_folder.has_tokenizer_files(args.hf_dir)
        if has_tokenizer:
            tok = Tokenizer(args.hf_dir)  # a bad tokenizer file is named before anything is written
        config, params = hf.load(args.hf_dir, dtype=args.dtype, progress=True, quantize=args.quantize,
                                 quant_group=args.quant_group)
        tmp = out.with_name(f".{out.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            checkpoint.save_params(tmp, config, params)
            if args.quantize:
                quantized_base.write_record(tmp, quantized_base.record(args.quantize, args.quant_group,
                                                                       config.param_dtype))
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
    if args.quantize:
        how = quantized_base.describe(quantized_base.record(args.quantize, args.quant_group, config.param_dtype))
        float_mb = config.num_params() * jax.numpy.dtype(config.param_dtype).itemsize / 1e6
        print(f"quantized: projections and embedding tables in {how}; {_nbytes(params) / 1e6:.1f} MB of "
              f"parameters ({config.param_dtype}: {float_mb:.1f} MB unquantized)")
    print(f"converted {args.hf_dir} -> {out}: {config.num_params() / 1e9:.3f}B parameters ({config.param_dtype}), "
          f"{time.time() - t0:.1f}s, peak RSS {peak_gb:.2f} GB")
    return 0


def _nbytes(params) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(params))


if __name__ == "__main__":
    sys.exit(main())
