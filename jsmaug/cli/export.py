"""Orbax checkpoint (the converter's output, or a training workdir: its policy params) -> HF Mixtral folder.

    jsmaug export --ckpt_dir runs/tiny_dpop --out_dir export/tiny [--step N] [--dtype bfloat16]
                                      [--tokenizer FOLDER_OR_FILE | --no_tokenizer]
                                      [--base_model HUB_ID] [--license ID] [--dataset NAME ...]
    jsmaug export --peft --ckpt_dir runs/lora --out_dir export/lora-peft [--base_hf_dir HF_BASE] [--step N]
    jsmaug export --quantized --ckpt_dir runs/qlora --out_dir export/base-nf4 [--dtype float32]

The export carries the tokenizer files, so transformers, TRL and lm-eval read it as jsmaug does: a
tokenizer.json tokenizer's files copied as they are (tokenizer.json, tokenizer_config.json,
special_tokens_map.json, chat_template.jinja, ...), or for a SentencePiece model what a Mixtral hub repository
ships (tokenizer.model, tokenizer.json, tokenizer_config.json, special_tokens_map.json). Without --tokenizer: a
training workdir's own (its config.json's data.tokenizer_path, else its init_from's tokenizer; and its
data.chat_template), a converter checkpoint's tokenizer files if it holds them, else Mixtral's
(mistral-common's tokenizer.model.v1).

The export carries a model card, README.md (`jsmaug.eval.card`; docs/conversion.md, "The model card"): the base
model (what the run started from, or --base_model), the license (the base's, else --license), tags, the training
files (or --dataset names), the run's training settings and every result recorded for it (a workdir's
hf/README.md results go with an export of its final step).

--quantized: an NF4 base as it is, in bitsandbytes' 4-bit serialization (`jsmaug.hf.bnb`; docs/conversion.md,
"Quantized bases out"): transformers loads it with `from_pretrained` as a `load_in_4bit` model.

--peft: a LoRA run's adapters alone, in PEFT's format, the experts' included (gpt-oss's fused 3-D expert
parameters as PEFT's `target_parameters`; `jsmaug.hf.peft`; docs/conversion.md, "PEFT adapters").
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
from pathlib import Path

from jsmaug import hf  # noqa: E402
from jsmaug.data import batches as data, formats as pair_formats, tokenizer_folder
from jsmaug.eval import card as model_card
from jsmaug.models.config import ConfigError  # noqa: E402
from jsmaug.train import checkpoint, outputs


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


def _is_workdir(ckpt_dir: str) -> bool:
    return (Path(ckpt_dir) / "checkpoints").is_dir() and (Path(ckpt_dir) / "config.json").is_file()


def write_export_card(ckpt_dir: str, out_dir: str, family: str, step: int | None, args) -> Path:
    """The export's README.md. A training workdir: its run's card (`outputs.write_run_card`), with the results
    recorded in its hf/README.md when the export is of the final step (the weights those results are of). A
    converter checkpoint: a card naming its source, not fine-tuned."""
    if _is_workdir(ckpt_dir):
        carried = []
        hf_card = Path(ckpt_dir) / "hf" / model_card.CARD
        final = outputs.run_card_inputs(ckpt_dir)["steps"]
        if hf_card.is_file() and step in (None, final):
            try:
                carried = model_card.load_card(hf_card.parent)[2]
            except checkpoint.CheckpointError as err:  # the export stands; its card just lacks them
                print(f"note: results of {hf_card} not carried: {err}")
        return outputs.write_run_card(ckpt_dir, out_dir, family, base_model=args.base_model, license=args.license,
                                      datasets=args.dataset, results=carried)
    base = model_card.trace_base(ckpt_dir)
    bm = args.base_model or base.base_model
    lic = model_card.choose_license(base.license, args.license)
    return model_card.write_card(out_dir, base_model=bm, license=lic.get("license"), family=family, loss="",
                                 training={}, datasets=args.dataset or [],
                                 base_note=None if bm else (base.chain[-1] if base.chain else None),
                                 metadata={k: v for k, v in lic.items() if k != "license"})


def _export_peft(args) -> int:
    from jsmaug.hf import peft as peft_export

    try:
        s = peft_export.export_peft(args.ckpt_dir, args.out_dir, base_hf_dir=args.base_hf_dir, step=args.step,
                                    overwrite=args.overwrite)
    except (hf.CheckpointError, checkpoint.CheckpointError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"exported the adapters of {args.ckpt_dir} (step {s['step']}, rank {s['rank']}, alpha {s['alpha']}) -> "
          f"{args.out_dir} in PEFT's format: {s['tensors']} tensors, {s['bytes'] / 1e6:.1f} MB, base {s['base']}")
    return 0


def _checked_inputs(args) -> tuple[str | None, str | None]:
    """(tokenizer, chat template) of the export, everything checked before minutes of writing."""
    model_card.check_hub_id(args.base_model)
    hf.prepare_out_dir(Path(args.out_dir), args.overwrite)
    tokenizer, template = (None, None) if args.no_tokenizer else _tokenizer_of(args.ckpt_dir, args.tokenizer)
    hf.check_tokenizer_path(tokenizer)
    vocab = checkpoint.read_model_config(args.ckpt_dir, args.step).vocab_size
    size = data.Tokenizer(tokenizer).vocab_size if tokenizer else 0
    if size > vocab:  # a vocabulary padded beyond the tokenizer's (Qwen's) is fine
        if args.tokenizer:
            raise ConfigError(f"--tokenizer {tokenizer}: {size} tokens, but the model's vocabulary has {vocab}")
        print(f"note: the model's vocabulary ({vocab}) is smaller than {tokenizer}'s ({size}); exporting without "
              "tokenizer files (pass --tokenizer)")
        tokenizer, template = None, None
    if tokenizer:
        print(f"tokenizer: {tokenizer}" + (" (with the run's chat template)" if template else ""))
    return tokenizer, template


def _export_quantized(args, tokenizer, template) -> dict:
    """--quantized: the NF4 base in bitsandbytes' 4-bit form (`jsmaug.hf.bnb`), with a card that says what it is."""
    import numpy as np
    import jax.numpy as jnp

    from jsmaug.hf import bnb

    config, base, dtype = bnb.load_base(args.ckpt_dir, args.step)
    blocksize = bnb.check_base(config, base, args.ckpt_dir)
    dtype = args.dtype or dtype
    s = hf.save(args.out_dir, config, None, dtype=dtype, max_shard_size=args.max_shard_size, tokenizer_path=tokenizer,
                overwrite=args.overwrite, progress=True, chat_template=template,
                tensors=bnb.tensors(config, base, np.dtype(jnp.dtype(dtype)), blocksize),
                quantization_config=bnb.quantization_config(dtype))
    base_of = model_card.trace_base(args.ckpt_dir)
    bm = args.base_model or base_of.base_model
    lic = model_card.choose_license(base_of.license, args.license)
    lora_run = _is_workdir(args.ckpt_dir)
    note = (f"The frozen NF4 base (bitsandbytes 4-bit, blocks of {blocksize}, no double quantization) exported as "
            f"it is by `jsmaug export --quantized` from {args.ckpt_dir}"
            + (": the base this QLoRA run trained its adapters on; the adapters are exported with `jsmaug export "
               "--peft` and go back on top with `PeftModel.from_pretrained(base, adapters)`." if lora_run else ".")
            + f" Attention and dense-MLP projections are 4-bit; embeddings, lm_head, norms and MoE experts are "
              f"{dtype} (dequantized where jsmaug stored them in NF4).")
    card = model_card.write_card(args.out_dir, base_model=bm, license=lic.get("license"), family=config.model_type,
                                 loss="", training={}, datasets=args.dataset or [], description=note,
                                 base_note=None if bm else (base_of.chain[-1] if base_of.chain else None),
                                 tags=["bitsandbytes", "4-bit", "nf4"],
                                 metadata={k: v for k, v in lic.items() if k != "license"})
    print(f"model card: {card}")
    return s


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
    ap.add_argument("--base_model", default=None, help="the model card's base_model, a Hub id (default: what the "
                    "run started from, when its Hub id is known)")
    ap.add_argument("--license", default=None, help="the card's license when the base's is not known (e.g. "
                    "apache-2.0)")
    ap.add_argument("--dataset", action="append", default=None, help="a training dataset's name for the card "
                    "(repeat; default: the run's training files' names)")
    ap.add_argument("--peft", action="store_true", help="a LoRA run: write its adapters alone in PEFT's format "
                    "(adapter_config.json + adapter_model.safetensors), not merged weights")
    ap.add_argument("--base_hf_dir", default=None, help="with --peft: the HF folder of the run's base (checked "
                    "against the run; recorded as base_model_name_or_path; default: traced from init_from)")
    ap.add_argument("--quantized", action="store_true", help="an NF4 base (a `convert --quantize nf4` checkpoint, "
                    "or a QLoRA workdir's base) as it is, in bitsandbytes' 4-bit form (jsmaug.hf.bnb)")
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    if args.quantized and args.peft:
        ap.error("--quantized writes the base, --peft the adapters: run the export once for each")
    if args.peft:
        return _export_peft(args)
    try:
        tokenizer, template = _checked_inputs(args)
        if args.quantized:
            s = _export_quantized(args, tokenizer, template)
        else:
            config, params = checkpoint.load_params(args.ckpt_dir, step=args.step)
            s = hf.save(args.out_dir, config, params, dtype=args.dtype, max_shard_size=args.max_shard_size,
                        tokenizer_path=tokenizer, overwrite=args.overwrite, progress=True, chat_template=template)
            print(f"model card: {write_export_card(args.ckpt_dir, args.out_dir, config.model_type, args.step, args)}")
    except (hf.CheckpointError, checkpoint.CheckpointError, ConfigError, data.DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    print(f"exported {args.ckpt_dir} -> {args.out_dir}: {s['tensors']} tensors in {s['files']} file(s), "
          f"{s['bytes'] / 1e9:.3f} GB, {s['seconds']:.1f}s, peak RSS {peak_gb:.2f} GB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
