"""``python -m mlgate_client``: the command line (``cli``)."""

import sys

from mlgate_client.cli import main

sys.exit(main())
