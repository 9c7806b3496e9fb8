"""`jsmaug convert` (jsmaug/cli/convert.py), kept as tools/convert_hf_to_jax.py for the scripts that call it."""

import sys

from jsmaug.cli.convert import main

if __name__ == "__main__":
    sys.exit(main())
