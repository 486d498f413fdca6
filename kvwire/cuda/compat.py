"""``numba.cuda``, importable with numpy 2.5.

numba-cuda (0.30.4, the newest release in November 2026) registers an overload of
``np.row_stack`` when ``numba.cuda`` loads for a real GPU; numpy 2.5 removed that alias of
``np.vstack``, so the import fails with AttributeError, and every device path of kvwire
with it (seen on an H100 machine whose image has numpy 2.5.2 and numba-cuda). Restoring
the alias where it is missing changes nothing numpy computes: it was ``vstack`` by an
older name.
Every kvwire module imports ``cuda`` from here, never from numba directly.
"""

from __future__ import annotations

import numpy as np

if not hasattr(np, "row_stack"):
    np.row_stack = np.vstack

from numba import cuda  # after the alias

__all__ = ["cuda"]
