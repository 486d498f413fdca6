"""``backend="auto"``: UCX where the peer can be reached over it, TCP everywhere else.

Connecting: with no TLS asked for and ucxx importable, try the UCX bootstrap (which ends
with a ping over UCX); if ucxx is missing, the peer speaks only TCP, or the ping fails
(another fabric, another datacenter), connect again over TCP. UCX is tried only where it
has something TCP lacks: an RDMA transport both ends have, or shared memory with the peer
(``UcxOptions(shared_memory=True)`` on both sides, same host); otherwise UCX would move
the bytes over its own tcp transport, slower than kvwire's TCP backend. TLS always means
TCP, since UCX has no encryption. The choice is logged once per address, and every connection says
which backend carries it in ``backend_name`` (``"ucx"`` or ``"tcp"``).

Listening: one TCP port serves both. The first bytes of an accepted connection tell a UCX
bootstrap (``ucx.MAGIC``) from a kvwire TCP handshake or a TLS hello. A listener given an
``ssl_context`` accepts only TCP+TLS, so no client can downgrade it to plain UCX.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

from ..errors import KVWireError
from .tcp import TcpBackend, TcpListener, TcpOptions

log = logging.getLogger(__name__)

_logged: set[tuple[str, str]] = set()
_logged_lock = threading.Lock()


@dataclass(frozen=True)
class AutoOptions:
    """Options for each backend ``auto`` may pick; ``ucx_timeout_s`` caps the UCX attempt.

    ``ucx_over_tcp``: use UCX even where it has no fabric to offer (no RDMA transport here,
    no shared memory with the peer), i.e. where UCX would carry the bytes over its own tcp
    transport. Off by default: that measured slower than kvwire's TCP backend on loopback
    (2.6 against 4.3 GB/s at 256 MiB, perf.peers; 1.0 before kvwire set UCX's tcp send
    segments to 64 KiB) and has no TLS.
    """

    tcp: TcpOptions = field(default_factory=TcpOptions)
    ucx: object = None  # a ucx.UcxOptions; None for its defaults (typed loosely: ucxx may be absent)
    ucx_timeout_s: float = 5.0
    ucx_over_tcp: bool = False


def _log_once(address: str, choice: str, why: str) -> None:
    with _logged_lock:
        if (address, choice) in _logged:
            return
        _logged.add((address, choice))
    log.info("kvwire auto backend: %s uses %s (%s)", address, choice, why)


_OVER_TCP = (
    "UCX has no fabric to this peer (no RDMA transport both ends have, no shared memory) and over "
    "its tcp transport is slower than kvwire's TCP backend; AutoOptions(ucx_over_tcp=True) forces it"
)


def _ucx_module():
    """kvwire.transport.ucx if ucxx imports here, else None."""
    try:
        from . import ucx
    except ImportError:
        return None
    return ucx if ucx.ucx_available() else None


def _auto_options(options) -> AutoOptions:
    """AutoOptions from None, AutoOptions, TcpOptions or UcxOptions."""
    if options is None or isinstance(options, AutoOptions):
        return options or AutoOptions()
    if isinstance(options, TcpOptions):
        return AutoOptions(tcp=options)
    if type(options).__name__ == "UcxOptions":
        return AutoOptions(ucx=options)
    raise TypeError(f"the auto backend takes AutoOptions, TcpOptions or UcxOptions, got {type(options).__name__}")


def _tcp_connection(conn):
    conn.backend_name = "tcp"
    return conn


class AutoBackend:
    name = "auto"

    def connect(self, address: str, *, timeout_s: float, ssl_context=None, options=None):
        options = _auto_options(options)

        def over_tcp(why: str, tls=None):
            _log_once(address, "tcp", why)
            return _tcp_connection(
                TcpBackend().connect(address, timeout_s=timeout_s, ssl_context=tls, options=options.tcp)
            )

        if ssl_context is not None:
            return over_tcp("TLS requested; UCX has no encryption", ssl_context)
        ucx = _ucx_module()
        if ucx is None:
            return over_tcp("ucxx is not installed")
        ucx_options = options.ucx or ucx.UcxOptions()
        try:
            fabric = ucx.fabrics(ucx_options)
        except Exception as exc:  # noqa: BLE001 - UCX cannot start here: TCP
            return over_tcp(f"UCX cannot start here: {type(exc).__name__}: {exc}")
        if not (fabric or ucx_options.shared_memory or options.ucx_over_tcp):
            return over_tcp(_OVER_TCP)
        try:
            conn = ucx.UcxBackend().connect(
                address, timeout_s=min(timeout_s, options.ucx_timeout_s), options=ucx_options
            )
        except KVWireError as exc:
            return over_tcp(f"not reachable over UCX: {type(exc).__name__}: {exc}")
        if conn.transport == "ucx-net" and not conn.shared_fabrics and not options.ucx_over_tcp:
            # Shared memory was offered but the peer is on another host (or did not offer
            # it), or the two ends have no fabric transport in common.
            conn.close()
            return over_tcp(_OVER_TCP)
        _log_once(address, "ucx", f"{conn.transport}, fabric: {', '.join(conn.shared_fabrics) or 'none'}")
        return conn

    def listen(self, address: str, *, ssl_context=None, options=None):
        return AutoListener(address, ssl_context, _auto_options(options))


class AutoListener:
    """One TCP port for UCX bootstraps and kvwire TCP connections alike."""

    def __init__(self, address: str, ssl_context, options: AutoOptions):
        self._tcp = TcpListener(address, ssl_context, options.tcp)
        self.address = self._tcp.address
        self._options = options
        self._ucx = None if ssl_context is not None else _ucx_module()
        self._ucx_options = None
        if self._ucx is not None:
            self._ucx_options = options.ucx or self._ucx.UcxOptions()
            try:
                self._ucx._Hub.get(self._ucx_options)
            except Exception as exc:  # noqa: BLE001 - UCX cannot start here: serve TCP only
                log.warning("kvwire auto backend: UCX unavailable on %s, serving TCP only: %s", self.address, exc)
                self._ucx = None

    def accept(self):
        return self._tcp.accept()

    def start_tls(self, conn, timeout_s: float):
        """UCX bootstrap if the peer asked for one, else TCP (with TLS if configured)."""
        if self._ucx is not None and self._ucx.peek_magic(conn.sock, timeout_s):
            return self._ucx.accept_bootstrap(conn.sock, conn.peer, self._ucx_options, timeout_s)
        return _tcp_connection(self._tcp.start_tls(conn, timeout_s))

    def close(self) -> None:
        self._tcp.close()
