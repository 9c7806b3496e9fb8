"""Making preference pairs the Smaug paper's way, and measuring whether they are in DPOP's regime.

    read   source rows (JSONL, a JSON array, Parquet), each with its 'file:line N' place
    mc     ARC, HellaSwag and generic multiple-choice rows -> the lm-evaluation-harness prompt and choices
    math   MetaMath and GSM8K rows -> chosen, and rejected with one computed intermediate result changed
    shots  k-shot prefixes of solved examples from another file, never the row itself
    make   the writer (standard-format JSONL, written atomically, optional eval split)
    stats  token edit distance between chosen and rejected, and the reading it gives
    cli    `main(argv)`: the `make` and `stats` subcommands (tools/make_pairs.py, tools/pair_stats.py)

Usage and the paper's reasoning: docs/making-pairs.md.
"""
