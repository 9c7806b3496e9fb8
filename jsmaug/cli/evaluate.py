"""Evaluate a model: preference pairs (accuracy, implicit rewards), multiple choice (acc, acc_norm) and GSM8K by
generation (exact match, strict and flexible), the last two as lm-evaluation-harness 0.4.13 scores them.

    jsmaug evaluate --model runs/tiny_dpop [--reference CKPT] \
        [--preference data/sample/test.jsonl ...] [--mc data/sample/mc.jsonl ...] \
        [--generate gsm8k_test.jsonl ... --max_new_tokens 256] \
        [--num_fewshot K --fewshot_file FILE] [--chat_template tokenizer] [--out results.json] [--card MODEL_DIR]
    jsmaug evaluate --card MODEL_DIR --lm_eval_results lm_eval_out/results.json

Preference files may be in any of the trainer's formats (standard, implicit prompt, conversational with
--chat_template) and are tokenised exactly as the trainer tokenises them.
--generate files are in GSM8K's layout (question, answer ending in '#### N'); prompts, stop sequences, answer
extraction and scoring are lm-eval's `gsm8k` task's (docs/evaluation.md). --num_fewshot examples come from
--fewshot_file (GSM8K rows for --generate, multiple-choice rows for --mc), drawn per row as lm-eval's default
sampler draws them (seed 1234). --chat_template tokenizer renders --generate prompts with the model's chat
template, few-shot examples as turns, as lm-eval's --apply_chat_template does.
--model / --reference: a Hugging Face folder, a converter checkpoint or a training workdir (latest checkpoint).
Without --reference only the policy's own logps are reported (no implicit rewards). Prints a table and, with
--out, writes every metric and the per-row scores as JSON; --card adds the results to MODEL_DIR/README.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from jsmaug import eval as ev
from jsmaug import hf
from jsmaug.data import batches as data_lib
from jsmaug.data import formats
from jsmaug.eval import generation as gen_eval
from jsmaug.models.config import ConfigError
from jsmaug.train import checkpoint


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="required unless only --card with --lm_eval_results")
    ap.add_argument("--reference", default=None, help="the starting model, for implicit rewards")
    ap.add_argument("--preference", nargs="*", default=[], help="JSONL/Parquet files of prompt/chosen/rejected")
    ap.add_argument("--mc", nargs="*", default=[], help="JSONL files of query/choices/gold")
    ap.add_argument("--generate", nargs="*", default=[], help="JSONL files in GSM8K's layout (question, answer "
                    "ending in '#### N'), scored by greedy generation as lm-eval's gsm8k task scores them")
    ap.add_argument("--num_fewshot", type=int, default=0, help="few-shot examples per row (--generate and --mc)")
    ap.add_argument("--fewshot_file", default=None, help="where the few-shot examples come from (GSM8K rows for "
                    "--generate, multiple-choice rows for --mc; give the file of the kind you evaluate)")
    ap.add_argument("--max_new_tokens", type=int, default=gen_eval.LM_EVAL_MAX_GEN_TOKS,
                    help="--generate: tokens generated at most per row (lm-eval's max_gen_toks, default 256)")
    ap.add_argument("--fewshot_as_multiturn", type=lambda x: x.lower() in ("true", "1", "yes"), default=True,
                    help="with --chat_template, --generate's few-shot examples as turns (true, lm-eval's CLI "
                    "default with --apply_chat_template) or collapsed into one user message (false)")
    ap.add_argument("--tokenizer", default=None, help="a tokenizer folder (tokenizer.json or tokenizer.model) or "
                    "file (default: the model folder's own tokenizer files, or its hf/ export's, or those its run "
                    "trained with; else Mixtral's, from mistral-common)")
    ap.add_argument("--chat_template", default=None, help="conversational pairs and --generate prompts: a Jinja "
                    "file, or 'tokenizer' (the tokenizer folder's own: the model's when its tokenizer is)")
    ap.add_argument("--beta", type=float, default=0.3, help="beta of the implicit rewards")
    ap.add_argument("--max_length", type=int, default=512)
    ap.add_argument("--max_prompt_length", type=int, default=256)
    ap.add_argument("--batch_size", type=int, default=16, help="rows per forward (--generate: per generate call)")
    ap.add_argument("--dtype", default=None, help="cast the weights (e.g. bfloat16)")
    ap.add_argument("--out", default=None, help="write the results here as JSON")
    ap.add_argument("--card", default=None, help="a model folder whose README.md card gets these results")
    ap.add_argument("--lm_eval_results", default=None, help="with --card: an lm-evaluation-harness results JSON "
                    "(lm_eval --output_path) to add to the card")
    ap.add_argument("--no_progress", action="store_true", help="no progress line during --generate")
    return ap


def _check_inputs(ap: argparse.ArgumentParser, args) -> None:
    scoring = args.preference or args.mc or args.generate
    if not scoring and not (args.card and args.lm_eval_results):
        ap.error("give at least one --preference, --mc or --generate file (or --card with --lm_eval_results)")
    if scoring and not args.model:
        ap.error("--model is required to score files")
    if args.lm_eval_results and not args.card:
        ap.error("--lm_eval_results needs --card MODEL_DIR")
    if args.num_fewshot < 0:
        ap.error("--num_fewshot must be >= 0")
    if args.num_fewshot and not args.fewshot_file:
        ap.error("--num_fewshot needs --fewshot_file (the rows the examples are drawn from)")
    if args.num_fewshot and args.generate and args.mc:
        ap.error("--fewshot_file holds one kind of rows: score --generate and --mc few-shot in separate runs")
    if args.max_new_tokens < 1:
        ap.error("--max_new_tokens must be >= 1")


def _read_json(path: str) -> dict:
    try:
        doc = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise data_lib.DataError(f"{path}: file not found") from None
    except json.JSONDecodeError as err:
        raise data_lib.DataError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(doc, dict):
        raise data_lib.DataError(f"{path}: must hold a JSON object")
    return doc


def _score(args, tok, config, params, ref) -> dict:
    dcfg = data_lib.DataConfig(max_length=args.max_length, max_prompt_length=args.max_prompt_length,
                               chat_template=args.chat_template)
    # Every input is read and checked before the first (long) scoring run.
    prepared = {}
    for path in args.preference:
        examples, report = data_lib.prepare(path, dcfg, tok)
        print(f"{path}: {report}")
        if not examples:
            raise data_lib.DataError(f"{path}: no preference pairs to score ({report})")
        prepared[path] = examples
    mc_rows = {path: ev.read_multiple_choice(path) for path in args.mc}
    gen_rows = {path: ev.read_gsm8k(path) for path in args.generate}
    fewshot = None
    if args.num_fewshot:
        fewshot = (ev.read_gsm8k if args.generate else ev.read_multiple_choice)(args.fewshot_file)
    template = formats.load_chat_template(args.chat_template, tok) if args.generate and args.chat_template else None
    results = {}
    for path, examples in prepared.items():
        t0 = time.time()
        results[f"preference:{path}"] = ev.preference_eval(config, params, examples, ref, beta=args.beta,
                                                           batch_size=args.batch_size)
        print(f"  scored {len(examples)} pairs in {time.time() - t0:.1f}s")
    for path, rows in mc_rows.items():
        t0 = time.time()
        results[f"mc:{path}"] = ev.multiple_choice_eval(config, params, tok, rows, batch_size=args.batch_size,
                                                        num_fewshot=args.num_fewshot, fewshot_rows=fewshot)
        print(f"{path}: scored {len(rows)} questions in {time.time() - t0:.1f}s")
    for path, rows in gen_rows.items():
        t0 = time.time()
        results[f"generate:{path}"] = ev.gsm8k_eval(
            config, params, tok, rows, num_fewshot=args.num_fewshot, fewshot_rows=fewshot, chat_template=template,
            fewshot_as_multiturn=args.fewshot_as_multiturn, max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size, progress=not args.no_progress)
        print(f"{path}: generated for {len(rows)} rows in {time.time() - t0:.1f}s")
    return results


def main(argv=None) -> int:
    ap = _parser()
    args = ap.parse_args(argv)
    _check_inputs(ap, args)
    out_doc = None
    try:
        if args.card and not Path(args.card).is_dir():
            raise data_lib.DataError(f"--card {args.card}: no such model folder")
        lm_eval_doc = _read_json(args.lm_eval_results) if args.lm_eval_results else None
        if args.model and (args.preference or args.mc or args.generate):
            tok = data_lib.Tokenizer(args.tokenizer or ev.model_tokenizer_path(args.model))
            print(f"tokenizer: {tok.path}")
            t0 = time.time()
            config, params = ev.load_model(args.model, args.dtype)
            ref = ev.load_model(args.reference, args.dtype)[1] if args.reference else None
            print(f"loaded {args.model} ({config.num_params() / 1e6:.2f}M parameters) in {time.time() - t0:.1f}s")
            results = _score(args, tok, config, params, ref)
            print(ev.summary_table(results))
            out_doc = {"model": args.model, "reference": args.reference, "results": results}
            if args.out:
                ev.write_json(args.out, out_doc)
                print(f"wrote {args.out}")
        if args.card:
            from jsmaug.eval import card

            if out_doc is not None:
                print(f"card: {card.add_results(args.card, out_doc, where=args.out or 'jsmaug evaluate')}")
            if lm_eval_doc is not None:
                path = card.add_results(args.card, lm_eval_doc, source_name="lm-evaluation-harness",
                                        where=args.lm_eval_results)
                print(f"card: {path}")
    except (data_lib.DataError, checkpoint.CheckpointError, hf.CheckpointError, ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
