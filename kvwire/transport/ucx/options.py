"""UCX settings kvwire chooses for the context, unless the user chose them."""

from __future__ import annotations

from collections.abc import Sequence

from .control import CTRL_BYTES
from .library import user_ucx_settings

# UCX settings kvwire changes from UCX's own defaults, each unless the user sets it or a
# setting it depends on (in the environment, apart from ucxx's import-time defaults, or
# in ``UcxOptions.ucx_config``).
# TCP_TX_SEG_SIZE: UCX's tcp transport sends in 8 KiB segments by default; 64 KiB (its
# receive segment, so receive-side memory is unchanged, and a larger send segment than
# receive segment is refused) moves several times the bytes over UCX's tcp transport
# (perf/README.md, "Measurements behind the code").
# RNDV_THRESH: over UCX's tcp transport every message of 8 KiB or more is a rendezvous
# (the receiver answers a request to send before the bytes move), so each control message
# (a request's small tensors inline, up to CTRL_BYTES) cost a handshake and a hub round
# more at each end. Eager up to CTRL_BYTES: 256 KiB one-tensor transfers ~2x, 1 MiB
# ~1.4x, requests of small tensors ~1.2x (perf/README.md, "Measurements behind the code").
TUNED_DEFAULTS = {
    "TCP_TX_SEG_SIZE": ("64k", ("TCP_TX_SEG_SIZE", "TCP_RX_SEG_SIZE")),
    "RNDV_THRESH": (str(CTRL_BYTES + 1), ("RNDV_THRESH",)),
}
# Those measured only where UCX moves bytes over sockets and shared memory: a context with
# RDMA transports or a GPU keeps UCX's own choice there (eager bulk bytes would lose RDMA's
# zero-copy and GPU memory's direct paths up to that size).
HOST_ONLY = frozenset({"RNDV_THRESH"})


def tuned_defaults(ucx_config: Sequence[tuple[str, str]] = ()) -> dict[str, str]:
    """kvwire's defaults for the UCX context's settings the user has left alone."""
    given = {name for name, _ in ucx_config} | user_ucx_settings()
    return {name: value for name, (value, depends) in TUNED_DEFAULTS.items() if not given.intersection(depends)}
