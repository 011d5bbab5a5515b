"""``python -m mlgate.service``: the same command line as ``mlgate``."""

import sys

from mlgate.service.cli import main

sys.exit(main())
