"""`jsmaug upcycle` (jsmaug/cli/upcycle.py): dense HF checkpoint -> HF Mixtral checkpoint, as a script."""

import sys

from jsmaug.cli.upcycle import main

if __name__ == "__main__":
    sys.exit(main())
