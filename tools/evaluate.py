"""`jsmaug evaluate` (jsmaug/cli/evaluate.py), kept as tools/evaluate.py for the scripts that call it."""

import sys

from jsmaug.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
