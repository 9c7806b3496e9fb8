"""`jsmaug generate` (jsmaug/cli/generate.py), kept as tools/generate.py for the scripts that call it."""

import sys

from jsmaug.cli.generate import main

if __name__ == "__main__":
    sys.exit(main())
