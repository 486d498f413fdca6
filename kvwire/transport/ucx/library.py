"""ucxx itself, for the rest of the package: importing it (an optional dependency), and
the one place where its errors become kvwire errors."""

from __future__ import annotations

import os
import sys

from ...errors import KVWireError, PeerLostError, RemoteProtocolError, TransferTimeout

# ucxx writes its own defaults into os.environ when imported (UCX_RNDV_THRESH=8192, ...),
# where they look like the user's settings, to this process and to every child it starts.
# kvwire notes here the ones it saw ucxx write (NAME=VALUE, comma-separated), so that a
# setting still holding ucxx's value is not taken for the user's (``user_ucx_settings``).
UCXX_WROTE = "KVWIRE_UCXX_WROTE"


def load_ucxx():
    """(ucxx's libucxx module, its Array type); ImportError naming the extra to install."""
    # UCX writes its log (errors such as a dead peer's reset connection) to stdout by
    # default, i.e. into the application's own output (the soak's JSON lines broke on it).
    os.environ.setdefault("UCX_LOG_FILE", "stderr")
    before = None if "ucxx" in sys.modules else set(os.environ)
    try:
        import ucxx._lib.libucxx as api
        from ucxx._lib.arr import Array
    except ImportError as exc:
        raise ImportError(f"the ucx backend needs ucxx (pip install 'kvwire[ucx]'): {exc}") from exc
    if before is not None:
        wrote = [f"{k}={v}" for k, v in os.environ.items() if k.startswith("UCX_") and k not in before]
        if wrote:
            os.environ[UCXX_WROTE] = ",".join(filter(None, [os.environ.get(UCXX_WROTE, ""), *wrote]))
    return api, Array


def user_ucx_settings() -> set[str]:
    """The UCX settings (names without ``UCX_``) in this process's environment that are
    not ucxx's import-time defaults, as far as this process or its parent saw them written."""
    wrote = dict(item.split("=", 1) for item in os.environ.get(UCXX_WROTE, "").split(",") if "=" in item)
    return {k[4:] for k, v in os.environ.items() if k.startswith("UCX_") and wrote.get(k) != v}


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
