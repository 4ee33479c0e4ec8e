"""``python -m rsvl.cli``: the same as the ``rsvl`` console script."""

import sys

from rsvl.cli import main

sys.exit(main())
