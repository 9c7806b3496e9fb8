"""`jsmaug compare-losses` (jsmaug/cli/compare_losses.py), kept as tools/compare_losses.py for the scripts that call it."""

import sys

from jsmaug.cli.compare_losses import main

if __name__ == "__main__":
    sys.exit(main())
