"""`jsmaug pairs make`, `jsmaug pairs stats` (also tools/make_pairs.py and tools/pair_stats.py) and
`jsmaug pairs sample`.

    jsmaug pairs make --format arc ARC-Challenge/train.parquet --out arc.jsonl \
        --shots 25 --shots_from ARC-Challenge/validation.parquet
    jsmaug pairs stats arc.jsonl [--tokenizer PATH | --words]
    jsmaug pairs sample --model runs/x/hf --input gsm8k_train.jsonl --k 8 --out pairs.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Sequence

from jsmaug.data.files import DataError
from jsmaug.errors import CheckpointError

MAKE_EXAMPLES = """\
inputs (JSONL, a JSON array or Parquet, columns as the hub ships them):
  arc        question, choices.text, choices.label, answerKey       (allenai/ai2_arc)
  hellaswag  activity_label, ctx_a, ctx_b (or ctx), endings, label  (Rowan/hellaswag)
  mc         query, choices, gold                                   (tools/evaluate.py --mc rows)
  metamath   query, response ("The answer is: X" last)              (meta-math/MetaMathQA)
  gsm8k      question, answer (<<a*b=c>> annotations, "#### X" last) (openai/gsm8k)

examples:
  jsmaug pairs make --format gsm8k gsm8k/main/train-00000-of-00001.parquet --out gsm.jsonl --split_eval 500
  jsmaug pairs make --format arc ARC-Challenge/train-00000-of-00001.parquet --out arc.jsonl --max_wrong 3 \\
      --shots 25 --shots_from ARC-Challenge/validation-00000-of-00001.parquet
(docs/making-pairs.md)"""

STATS_EXAMPLES = """\
input: preference pairs, JSONL or Parquet, string columns chosen and rejected (prompt not needed).

examples:
  jsmaug pairs stats gsm.jsonl                    # Mixtral's tokenizer (shipped with mistral-common)
  jsmaug pairs stats pairs.parquet --tokenizer /models/tokenizer.model --json stats.json
  jsmaug pairs stats big.jsonl --words --sample 50000
(docs/making-pairs.md)"""

SAMPLE_EXAMPLES = """\
input: problems, JSONL/Parquet rows: GSM8K's {question, answer "... #### N"} (--verifier gsm8k), multiple
choice {question, choices, gold} (--verifier mc), or any rows with a 'prompt' for your own verifier.

examples:
  jsmaug pairs sample --model runs/x/hf --input gsm8k/train.jsonl --k 8 --out pairs.jsonl
  jsmaug pairs sample --model runs/x/hf --input arc.jsonl --verifier mc --chat_template tokenizer \\
      --k 8 --rule edit --pairs_per_problem 2 --out arc_pairs.jsonl
  jsmaug pairs sample --model M --input rows.jsonl --verifier my_checks.py:is_right --out pairs.jsonl
  jsmaug launch --processes 2 --devices_per_process 4 -- pairs sample --model M --input rows.jsonl \
      --mesh data=4,tensor=2 --out pairs.jsonl      # two processes, one mesh (on a pod: --distributed per host)
Interrupted? Run the same command again: finished problems (in OUT.partial) are skipped.
(docs/making-pairs.md, "Pairs the model makes itself")"""


def _add_sample(sub, fmt) -> None:
    from jsmaug.pairs.sample import RULES
    from jsmaug.pairs.verify import BUILT_IN

    sp = sub.add_parser("sample", help="pairs the model makes itself: k samples per problem, graded by a verifier",
                        epilog=SAMPLE_EXAMPLES, formatter_class=fmt, description="Samples k completions of every "
                        "problem with the model, grades them with a verifier, and writes pairs of a correct and a "
                        "wrong sample in the training format, with the model's log-probs of both as the "
                        "precomputed reference (ref_chosen_logps, ref_rejected_logps).")
    sp.add_argument("--model", required=True, help="a Hugging Face folder, a converter checkpoint or a workdir")
    sp.add_argument("--input", required=True, help="the problems (.jsonl, .json, .parquet)")
    sp.add_argument("--out", required=True, help="the pairs' .jsonl (OUT.partial holds finished problems meanwhile)")
    sp.add_argument("--k", type=int, default=8, help="samples per problem")
    sp.add_argument("--temperature", type=float, default=0.7)
    sp.add_argument("--top_p", type=float, default=0.95)
    sp.add_argument("--top_k", type=int, default=0, help="0 = off")
    sp.add_argument("--max_new_tokens", type=int, default=256)
    sp.add_argument("--seed", type=int, default=0, help="problem n's samples are seeded by (seed, n)")
    sp.add_argument("--verifier", default="gsm8k", help=f"one of {list(BUILT_IN)}, or module:function / "
                    "file.py:function, fn(problem: dict, completion: str) -> bool | float")
    sp.add_argument("--threshold", type=float, default=1.0, help="a sample is correct when its score is >= this")
    sp.add_argument("--pairs_per_problem", type=int, default=1)
    sp.add_argument("--rule", choices=RULES, default="likely", help="likely: the most likely wrong samples; edit: "
                    "the wrong samples nearest a correct one in token edit distance")
    sp.add_argument("--chat_template", default=None, help="'tokenizer' (the model's own) or a Jinja file; the "
                    "pairs are then conversations")
    sp.add_argument("--batch_size", type=int, default=64, help="rows (samples) per generate call; a step of "
                    "batch_size // k problems is graded and saved together")
    sp.add_argument("--mesh", default=None, help="sample on a mesh: axis=size items of a run config's mesh "
                    "section, e.g. data=2,tensor=2 (default: one device; with several processes, data over all)")
    dist = sp.add_argument_group("several processes (`jsmaug launch ... -- pairs sample ...` fills these in)")
    dist.add_argument("--distributed", action="store_true", help="join the other processes (addresses "
                      "auto-detected on Cloud TPU VMs, SLURM, Open MPI, Kubernetes)")
    dist.add_argument("--coordinator_address", default=None, help="host:port of process 0 (implies --distributed)")
    dist.add_argument("--num_processes", type=int, default=None)
    dist.add_argument("--process_id", type=int, default=None)
    sp.add_argument("--until", nargs="*", default=None, help="stop sequences (default: gsm8k's for the gsm8k "
                    "verifiers, else none; the tokenizer's EOS always)")
    sp.add_argument("--tokenizer", default=None, help="default: the model's own tokenizer files")
    sp.add_argument("--dtype", default=None, help="the model's dtype for sampling (default: as stored)")
    sp.add_argument("--max_rows", type=int, default=None, help="only the first N problems")
    sp.add_argument("--quiet", action="store_true", help="no progress lines")


def parser() -> argparse.ArgumentParser:
    from jsmaug.pairs.make import FORMATS

    ap = argparse.ArgumentParser(prog="jsmaug pairs", description="Preference pairs the Smaug paper's way, and "
                                 "whether they are in the regime where DPOP matters.")
    sub = ap.add_subparsers(dest="command", required=True)
    fmt = argparse.RawDescriptionHelpFormatter
    mk = sub.add_parser("make", help="make pairs from multiple-choice or math rows", epilog=MAKE_EXAMPLES,
                        formatter_class=fmt, description="Standard-format pairs {prompt, chosen, rejected}, "
                        "written atomically: one per wrong choice (arc, hellaswag, mc), or chosen = the solution "
                        "and rejected = it with one computed intermediate result changed (metamath, gsm8k).")
    mk.add_argument("inputs", nargs="+", help="source files (.jsonl, .json, .parquet), read in order")
    mk.add_argument("--format", required=True, choices=FORMATS)
    mk.add_argument("--out", required=True, help="the .jsonl to write (with --split_eval also NAME.eval.jsonl)")
    mk.add_argument("--seed", type=int, default=0, help="the corruption, --max_wrong, shots and split draws")
    mk.add_argument("--shots", type=int, default=0, help="k solved examples before each prompt")
    mk.add_argument("--shots_from", nargs="+", default=[], help="files of solved examples (same --format)")
    mk.add_argument("--max_rows", type=int, default=None, help="read only the first N source rows")
    mk.add_argument("--max_wrong", type=int, default=None, help="at most K pairs per question (arc, hellaswag, mc)")
    mk.add_argument("--split_eval", type=int, default=0, help="N source rows' pairs to OUT's .eval.jsonl sibling")
    mk.add_argument("--on_bad_row", choices=("error", "skip"), default="error")
    st = sub.add_parser("stats", help="token edit distance between chosen and rejected", epilog=STATS_EXAMPLES,
                        formatter_class=fmt, description="Levenshtein distance over token ids between each pair's "
                        "chosen and rejected completions, its distribution, the shared-prefix share, and a "
                        "one-line reading of whether DPO is likely to lower the chosen log-probs.")
    st.add_argument("file", help="preference pairs (.jsonl, .json, .parquet)")
    tok = st.add_mutually_exclusive_group()
    tok.add_argument("--tokenizer", default=None, help="a SentencePiece model (default: Mixtral's shipped one)")
    tok.add_argument("--words", action="store_true", help="split on whitespace instead of a tokenizer")
    st.add_argument("--sample", type=int, default=None, help="measure N pairs drawn at random (--seed)")
    st.add_argument("--seed", type=int, default=0)
    st.add_argument("--json", default=None, help="also write the figures to this JSON file")
    st.add_argument("--on_bad_row", choices=("error", "skip"), default="error")
    _add_sample(sub, fmt)
    return ap


def _make(args) -> None:
    from jsmaug.pairs.make import make_pairs

    if args.shots and not args.shots_from:
        raise DataError("--shots needs --shots_from FILE")
    summary = make_pairs(args.format, args.inputs, args.out, seed=args.seed, shots=args.shots,
                         shots_from=args.shots_from, max_rows=args.max_rows, split_eval=args.split_eval,
                         on_bad_row=args.on_bad_row, max_wrong=args.max_wrong)
    print(summary.line())


def _stats(args) -> None:
    from jsmaug.pairs import stats

    start = time.perf_counter()
    chosen, rejected = stats.read_pairs(args.file, args.on_bad_row, args.sample, args.seed)
    tokenizer = None if args.words else stats.load_tokenizer(args.tokenizer)
    result = stats.pair_stats(chosen, rejected, tokenizer)
    result["file"], result["seconds"] = args.file, round(time.perf_counter() - start, 1)
    print(stats.report(result))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=2)


def mesh_option(text: str | None):
    """`--mesh data=2,fsdp=2,tensor=2` -> a `sharding.MeshConfig` (the keys of a run config's `mesh:` section;
    axes left out keep its defaults: data -1, the others 1), or None."""
    import jax

    from jsmaug.models.config import ConfigError
    from jsmaug.parallel import sharding as shd

    if not text:
        return None
    sizes = {}
    for item in text.split(","):
        name, eq, value = item.strip().partition("=")
        if not eq or name not in shd.MESH_AXES or not value.lstrip("-").isdigit():
            raise DataError(f"--mesh {text!r}: expected axis=size items separated by commas, axes "
                            f"{list(shd.MESH_AXES)}, e.g. data=2,tensor=2")
        sizes[name] = int(value)
    mesh_config = shd.MeshConfig(**sizes)
    try:
        mesh_config.sizes(jax.device_count())
    except ConfigError as err:
        raise DataError(f"--mesh {text!r}: {err}") from None
    return mesh_config


def _sample(args) -> None:
    from jsmaug.models.config import ConfigError
    from jsmaug.parallel import distributed
    from jsmaug.pairs.sample import sample_command

    dist = distributed.DistributedConfig(enabled=args.distributed, coordinator_address=args.coordinator_address,
                                         num_processes=args.num_processes, process_id=args.process_id)
    try:
        dist.validate()
        distributed.initialize(dist)  # before any other JAX call (the mesh's check counts the devices)
    except ConfigError as err:
        raise DataError(str(err).replace("distributed.", "--")) from None
    args.mesh = mesh_option(args.mesh)
    summary = sample_command(args)
    if distributed.is_writer():
        print(summary.line())


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        {"make": _make, "stats": _stats, "sample": _sample}[args.command](args)
    except (DataError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
