"""Evaluate a model: preference pairs (accuracy, implicit rewards) and multiple choice (acc, acc_norm).

    jsmaug evaluate --model runs/tiny_dpop [--reference CKPT] \
        [--preference data/sample/test.jsonl ...] [--mc data/sample/mc.jsonl ...] [--out results.json]

Preference files may be in any of the trainer's formats (standard, implicit prompt, conversational with
--chat_template) and are tokenised exactly as the trainer tokenises them.
--model / --reference: a Hugging Face folder, a converter checkpoint or a training workdir (latest checkpoint).
Without --reference only the policy's own logps are reported (no implicit rewards). Prints a table and, with
--out, writes every metric and the per-row scores as JSON.
"""

from __future__ import annotations

import argparse
import sys
import time

from jsmaug import hf  # noqa: E402
from jsmaug.data import batches as data_lib
from jsmaug.models.config import ConfigError  # noqa: E402
from jsmaug.train import checkpoint, eval as eval_lib


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--reference", default=None, help="the starting model, for implicit rewards")
    ap.add_argument("--preference", nargs="*", default=[], help="JSONL/Parquet files of prompt/chosen/rejected")
    ap.add_argument("--mc", nargs="*", default=[], help="JSONL files of query/choices/gold")
    ap.add_argument("--tokenizer", default=None, help="a tokenizer folder (tokenizer.json or tokenizer.model) or "
                    "file (default: the model folder's own tokenizer files, or its hf/ export's, or those its run "
                    "trained with; else Mixtral's, from mistral-common)")
    ap.add_argument("--chat_template", default=None, help="for conversational pairs: a Jinja file, or 'tokenizer' "
                    "(the tokenizer folder's own: the model's when its tokenizer is), as data.chat_template")
    ap.add_argument("--beta", type=float, default=0.3, help="beta of the implicit rewards")
    ap.add_argument("--max_length", type=int, default=512)
    ap.add_argument("--max_prompt_length", type=int, default=256)
    ap.add_argument("--batch_size", type=int, default=16, help="rows per forward")
    ap.add_argument("--dtype", default=None, help="cast the weights (e.g. bfloat16)")
    ap.add_argument("--out", default=None, help="write the results here as JSON")
    args = ap.parse_args(argv)
    if not args.preference and not args.mc:
        ap.error("give at least one --preference or --mc file")
    try:
        tok = data_lib.Tokenizer(args.tokenizer or eval_lib.model_tokenizer_path(args.model))
        print(f"tokenizer: {tok.path}")
        t0 = time.time()
        config, params = eval_lib.load_model(args.model, args.dtype)
        ref = eval_lib.load_model(args.reference, args.dtype)[1] if args.reference else None
        print(f"loaded {args.model} ({config.num_params() / 1e6:.2f}M parameters) in {time.time() - t0:.1f}s")
        # The trainer's tokenisation (data.prepare): the joined text split where the prompt ends, any TRL format.
        dcfg = data_lib.DataConfig(max_length=args.max_length, max_prompt_length=args.max_prompt_length,
                                   chat_template=args.chat_template)
        results = {}
        for path in args.preference:
            t0 = time.time()
            examples, report = data_lib.prepare(path, dcfg, tok)
            print(f"{path}: {report}")
            if not examples:
                raise data_lib.DataError(f"{path}: no preference pairs to score ({report})")
            results[f"preference:{path}"] = eval_lib.preference_eval(config, params, examples, ref, beta=args.beta,
                                                                     batch_size=args.batch_size)
            print(f"  scored {len(examples)} pairs in {time.time() - t0:.1f}s")
        for path in args.mc:
            t0 = time.time()
            rows = eval_lib.read_multiple_choice(path)
            results[f"mc:{path}"] = eval_lib.multiple_choice_eval(config, params, tok, rows,
                                                                  batch_size=args.batch_size)
            print(f"{path}: scored {len(rows)} questions in {time.time() - t0:.1f}s")
    except (data_lib.DataError, checkpoint.CheckpointError, hf.CheckpointError, ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(eval_lib.summary_table(results))
    if args.out:
        eval_lib.write_json(args.out, {"model": args.model, "reference": args.reference, "results": results})
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
