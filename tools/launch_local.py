"""`jsmaug launch` (jsmaug/cli/launch.py), kept as tools/launch_local.py for the scripts that call it."""

import sys

from jsmaug.cli.launch import main

if __name__ == "__main__":
    sys.exit(main())
