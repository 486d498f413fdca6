"""``python -m serving``: the same as the ``kvwire-serve`` console script."""

import sys

from .cli import main

sys.exit(main())
