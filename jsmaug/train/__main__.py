"""`python -m jsmaug.train CONFIG [key=value ...]`: the same as `jsmaug train`."""

import sys

from jsmaug.train.run import main

sys.exit(main())
