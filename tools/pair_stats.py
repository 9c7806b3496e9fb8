"""Token edit distance between chosen and rejected, and whether DPOP matters (`jsmaug pairs stats`); see `--help`.

    python tools/pair_stats.py pairs.jsonl [--tokenizer PATH | --words]
"""

import sys

from jsmaug.pairs.cli import main

if __name__ == "__main__":
    sys.exit(main(["stats", *sys.argv[1:]]))
