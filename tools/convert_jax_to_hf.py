"""`jsmaug export` (jsmaug/cli/export.py), kept as tools/convert_jax_to_hf.py for the scripts that call it."""

import sys

from jsmaug.cli.export import main

if __name__ == "__main__":
    sys.exit(main())
