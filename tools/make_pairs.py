"""Preference pairs the Smaug paper's way (`jsmaug pairs make`); see `--help` and docs/making-pairs.md.

    python tools/make_pairs.py --format gsm8k train.jsonl --out pairs.jsonl --split_eval 50 --seed 0
"""

import sys

from jsmaug.pairs.cli import main

if __name__ == "__main__":
    sys.exit(main(["make", *sys.argv[1:]]))
