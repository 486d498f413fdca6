"""``backend="auto"``: UCX where the peer can be reached over it, TCP everywhere else.

Connecting: ``choose`` decides, from what UCX offers here and (once a UCX connection is
made) what the two ends share, whether UCX is worth it. UCX is tried only where it has
something TCP lacks: an RDMA transport both ends have, or shared memory with the peer
(``UcxOptions(shared_memory=True)`` on both sides, same host); otherwise UCX would move
the bytes over its own tcp transport, slower than kvwire's TCP backend. TLS always means
TCP, since UCX has no encryption. If ucxx is missing, the peer speaks only TCP, or the
UCX bootstrap's ping fails (another fabric, another datacenter), the connection is made
again over TCP. The choice is logged once per address, and every connection says which
backend carries it in ``capabilities.backend`` (``"ucx"`` or ``"tcp"``).

Listening: one TCP port serves both. The first bytes of an accepted connection tell a UCX
bootstrap (``ucx.MAGIC``) from a kvwire TCP handshake or a TLS hello. A listener given an
``ssl_context`` accepts only TCP+TLS, so no client can downgrade it to plain UCX.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from ..errors import KVWireError
from .base import AutoOptions, Capabilities, TcpOptions, UcxOptions
from .tcp import TcpBackend, TcpListener

log = logging.getLogger(__name__)

__all__ = ["AutoBackend", "AutoListener", "AutoOptions", "Choice", "choose", "ucx_module"]

_logged: set[tuple[str, str]] = set()
_logged_lock = threading.Lock()

OVER_TCP = (
    "UCX has no fabric to this peer (no RDMA transport both ends have, no shared memory) and over "
    "its tcp transport is slower than kvwire's TCP backend; AutoOptions(ucx_over_tcp=True) forces it"
)


@dataclass(frozen=True)
class Choice:
    backend: str  # "ucx" or "tcp"
    why: str


def choose(options: AutoOptions, *, tls: bool, here: Capabilities | str, link: Capabilities | None = None) -> Choice:
    """Which backend carries a connection, and why; no I/O.

    ``here``: what UCX offers in this process (``ucx.local_capabilities``), or why it cannot
    run here. ``link``: the capabilities of the UCX connection once made (what the two ends
    share), or None before trying: then "ucx" means "try UCX".
    """
    if tls:
        return Choice("tcp", "TLS requested; UCX has no encryption")
    if isinstance(here, str):
        return Choice("tcp", here)
    if link is None:
        worth_trying = here.fabrics or here.shared_memory or options.ucx_over_tcp
        return Choice("ucx", "trying UCX") if worth_trying else Choice("tcp", OVER_TCP)
    if not (link.shared_memory or link.fabrics or options.ucx_over_tcp):
        # Shared memory was offered but the peer is on another host (or did not offer
        # it), or the two ends have no fabric transport in common.
        return Choice("tcp", OVER_TCP)
    transport = "ucx-local" if link.shared_memory else "ucx-net"
    return Choice("ucx", f"{transport}, fabric: {', '.join(link.fabrics) or 'none'}")


def auto_options(options) -> AutoOptions:
    """AutoOptions from None, AutoOptions, TcpOptions or UcxOptions."""
    if options is None or isinstance(options, AutoOptions):
        return options or AutoOptions()
    if isinstance(options, TcpOptions):
        return AutoOptions(tcp=options)
    if isinstance(options, UcxOptions):
        return AutoOptions(ucx=options)
    raise TypeError(f"the auto backend takes AutoOptions, TcpOptions or UcxOptions, got {type(options).__name__}")


def ucx_module():
    """kvwire.transport.ucx if ucxx imports here, else None."""
    try:
        from . import ucx
    except ImportError:
        return None
    return ucx if ucx.ucx_available() else None


def _ucx_here(ucx, options: UcxOptions) -> Capabilities | str:
    """What UCX offers in this process, or why it cannot run here."""
    if ucx is None:
        return "ucxx is not installed"
    try:
        return ucx.local_capabilities(options)
    except Exception as exc:  # noqa: BLE001 - UCX cannot start here: TCP
        return f"UCX cannot start here: {type(exc).__name__}: {exc}"


def forget_logged_choices() -> None:
    """Log the next choice for every address again (each is said once per process)."""
    with _logged_lock:
        _logged.clear()


def _log_once(address: str, choice: Choice) -> None:
    with _logged_lock:
        if (address, choice.backend) in _logged:
            return
        _logged.add((address, choice.backend))
    log.info("kvwire auto backend: %s uses %s (%s)", address, choice.backend, choice.why)


class AutoBackend:
    name = "auto"
    options_type = AutoOptions

    def connect(self, address: str, *, timeout_s: float, ssl_context=None, options=None):
        options = auto_options(options)
        tls = ssl_context is not None
        ucx = None if tls else ucx_module()
        here = "TLS requested" if tls else _ucx_here(ucx, options.ucx)
        choice = choose(options, tls=tls, here=here)
        if choice.backend == "ucx":
            try:
                conn = ucx.UcxBackend().connect(
                    address, timeout_s=min(timeout_s, options.ucx_timeout_s), options=options.ucx
                )
            except KVWireError as exc:
                choice = Choice("tcp", f"not reachable over UCX: {type(exc).__name__}: {exc}")
            else:
                choice = choose(options, tls=False, here=here, link=conn.capabilities)
                if choice.backend == "ucx":
                    _log_once(address, choice)
                    return conn
                conn.close()
        _log_once(address, choice)
        return TcpBackend().connect(address, timeout_s=timeout_s, ssl_context=ssl_context, options=options.tcp)

    def listen(self, address: str, *, ssl_context=None, options=None):
        return AutoListener(address, ssl_context, auto_options(options))


class AutoListener:
    """One TCP port for UCX bootstraps and kvwire TCP connections alike."""

    def __init__(self, address: str, ssl_context, options: AutoOptions):
        self._tcp = TcpListener(address, ssl_context, options.tcp)
        self.address = self._tcp.address
        self._options = options
        self._ucx = None if ssl_context is not None else ucx_module()
        if self._ucx is not None:
            here = _ucx_here(self._ucx, options.ucx)
            if isinstance(here, str):
                log.warning("kvwire auto backend: UCX unavailable on %s, serving TCP only: %s", self.address, here)
                self._ucx = None

    def accept(self):
        return self._tcp.accept()

    def start_tls(self, conn, timeout_s: float):
        """UCX bootstrap if the peer asked for one, else TCP (with TLS if configured)."""
        if self._ucx is not None and self._ucx.peek_magic(conn.sock, timeout_s):
            return self._ucx.accept_bootstrap(conn.sock, conn.peer, self._options.ucx, timeout_s)
        return self._tcp.start_tls(conn, timeout_s)

    def close(self) -> None:
        self._tcp.close()
