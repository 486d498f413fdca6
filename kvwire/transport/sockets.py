"""Plain TCP sockets as every backend uses them: dialing, listening, per-socket settings.

The TCP backend carries kvwire's bytes on them; the UCX backend bootstraps over them and
keeps one as its liveness channel; the serving CLI binds its HTTP ports with the same
helper, so "port in use" is found and named the same way everywhere.
"""

from __future__ import annotations

import logging
import socket

from ..address import format_address, parse_address
from ..errors import PeerLostError
from .base import TcpOptions

log = logging.getLogger(__name__)


def dial(address: str, host: str, port: int, timeout_s: float) -> socket.socket:
    """A connected TCP socket, or PeerLostError saying why (unknown host, refused, timed out;
    ``refused`` is set where nothing listens there)."""
    try:
        return socket.create_connection((host, port), timeout=timeout_s)
    except socket.gaierror as exc:
        raise PeerLostError(f"cannot connect to {address}: host {host!r} not found ({exc.strerror})",
                            peer=address) from None
    except TimeoutError:
        raise PeerLostError(f"cannot connect to {address}: no answer within {timeout_s:g}s", peer=address) from None
    except OSError as exc:
        raise PeerLostError(f"cannot connect to {address}: {exc.strerror or exc}", peer=address,
                            refused=isinstance(exc, ConnectionRefusedError)) from None


def bind_socket(host: str, port: int, *, receive_buffer_bytes: int | None = None, backlog: int = 256) -> socket.socket:
    """A listening socket on host:port; the OSError of ``bind`` as it came (callers name
    the address or flag in their own words)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if receive_buffer_bytes:  # must be set before listen() to apply to accepted sockets' window
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer_bytes)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.listen(backlog)
    return sock


class ListeningSocket:
    """A bound TCP port that hands out accepted sockets until it is closed."""

    def __init__(self, address: str, options: TcpOptions):
        host, port = parse_address(address, what="listen address", listen=True)
        try:
            self._sock = bind_socket(host, port, receive_buffer_bytes=options.buffer_bytes)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot listen on {address}: {exc.strerror}") from None
        self.address = format_address(host, self._sock.getsockname()[1])
        self._options = options
        self._closed = False

    def accept(self) -> tuple[socket.socket, str] | None:
        """(socket configured with the options, the peer's "HOST:PORT"), or None once closed."""
        while True:
            try:
                sock, addr = self._sock.accept()
            except OSError:
                if self._closed:
                    return None
                continue
            configure_socket(sock, self._options)
            return sock, format_address(addr[0], addr[1])

    def close(self) -> None:
        self._closed = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()


def configure_socket(sock: socket.socket, options: TcpOptions) -> None:
    """No Nagle; the buffers if pinned; keepalive and TCP_USER_TIMEOUT from ``peer_timeout_s``;
    the congestion control if named (a warning where this kernel lacks it)."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if options.buffer_bytes:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, options.buffer_bytes)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, options.buffer_bytes)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    idle = max(1, int(options.peer_timeout_s / 3))
    for opt, value in (("TCP_KEEPIDLE", idle), ("TCP_KEEPINTVL", idle), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, opt):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, opt), value)
    if hasattr(socket, "TCP_USER_TIMEOUT"):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(options.peer_timeout_s * 1000))
    if options.congestion_control and hasattr(socket, "TCP_CONGESTION"):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, options.congestion_control.encode())
        except OSError as exc:
            log.warning("congestion control %r not available here: %s", options.congestion_control, exc)
