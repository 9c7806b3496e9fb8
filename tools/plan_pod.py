"""`jsmaug plan` (jsmaug/cli/plan.py), kept as tools/plan_pod.py for the scripts that call it."""

import sys

from jsmaug.cli.plan import main

if __name__ == "__main__":
    sys.exit(main())
