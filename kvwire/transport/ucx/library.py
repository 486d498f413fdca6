"""ucxx itself, for the rest of the package: importing it (an optional dependency), and
the one place where its errors become kvwire errors."""

from __future__ import annotations

import os

from ...errors import KVWireError, PeerLostError, RemoteProtocolError, TransferTimeout


def load_ucxx():
    """(ucxx's libucxx module, its Array type); ImportError naming the extra to install."""
    # UCX writes its log (errors such as a dead peer's reset connection) to stdout by
    # default, i.e. into the application's own output (the soak's JSON lines broke on it).
    os.environ.setdefault("UCX_LOG_FILE", "stderr")
    try:
        import ucxx._lib.libucxx as api
        from ucxx._lib.arr import Array
    except ImportError as exc:
        raise ImportError(f"the ucx backend needs ucxx (pip install 'kvwire[ucx]'): {exc}") from exc
    return api, Array


def ucx_available() -> bool:
    """Whether ucxx can be imported here (it is an optional dependency: the ``ucx`` extra)."""
    try:
        load_ucxx()
    except ImportError:
        return False
    return True


def map_error(exc: BaseException, peer: str) -> KVWireError:
    """The one place where UCX errors become kvwire errors."""
    if isinstance(exc, KVWireError):
        return exc
    api = load_ucxx()[0]
    if isinstance(exc, (api.UCXEndpointTimeoutError, api.UCXTimedOutError)):
        return TransferTimeout(f"UCX connection to {peer} timed out: {exc}")
    if isinstance(exc, api.UCXMessageTruncatedError):
        return RemoteProtocolError(f"UCX message from {peer} larger than announced: {exc}")
    if isinstance(exc, api.UCXCanceledError):
        return PeerLostError(f"UCX connection to {peer} was closed")
    return PeerLostError(f"UCX connection to {peer} lost: {type(exc).__name__}: {exc}")
