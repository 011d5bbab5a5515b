"""``python -m mlgate``: the same command line as the ``mlgate`` console script."""

import sys

from mlgate.service.cli import main

sys.exit(main())
