"""``python -m meft ...``: the same as the ``meft`` command."""

import sys

from meft.cli import main

sys.exit(main())
