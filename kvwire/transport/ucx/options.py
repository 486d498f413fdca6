"""UCX settings kvwire chooses for the context, unless the user chose them."""

from __future__ import annotations

import os
from collections.abc import Sequence

# UCX settings kvwire changes from UCX's own defaults, each unless the user sets it or a
# setting it depends on (in the environment or ``UcxOptions.ucx_config``).
# TCP_TX_SEG_SIZE: UCX's tcp transport sends in 8 KiB segments by default; 64 KiB (its
# receive segment, so receive-side memory is unchanged, and a larger send segment than
# receive segment is refused) moves several times the bytes over UCX's tcp transport
# (perf/README.md, "Measurements behind the code").
TUNED_DEFAULTS = {"TCP_TX_SEG_SIZE": ("64k", ("TCP_TX_SEG_SIZE", "TCP_RX_SEG_SIZE"))}


def tuned_defaults(ucx_config: Sequence[tuple[str, str]] = ()) -> dict[str, str]:
    """kvwire's defaults for the UCX context's settings the user has left alone."""
    given = {name for name, _ in ucx_config} | {name[4:] for name in os.environ if name.startswith("UCX_")}
    return {name: value for name, (value, depends) in TUNED_DEFAULTS.items() if not given.intersection(depends)}
