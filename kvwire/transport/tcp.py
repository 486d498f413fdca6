"""TCP backend: blocking sockets driven by kvwire's own I/O threads.

Payloads go from the caller's memory to the kernel with ``sendmsg`` on memoryviews, and
from the kernel into their destination with ``recv_into(MSG_WAITALL)``: no Python-level
copies, and the GIL is released for the whole syscall. TLS (an ``ssl.SSLContext``) uses
the same code with ``sendall`` per buffer, since SSL sockets have no ``sendmsg``.
"""

from __future__ import annotations

import logging
import socket
import ssl
import struct
from dataclasses import dataclass
from typing import Sequence

from ..address import format_address, parse_address
from ..errors import AuthenticationError, PeerLostError, TransferTimeout
from .base import LinkStats

log = logging.getLogger(__name__)

_IOV_MAX = 1024
_TCP_INFO_BYTES = 232


@dataclass(frozen=True)
class TcpOptions:
    """Per-socket settings.

    ``buffer_bytes=None`` leaves SO_SNDBUF/SO_RCVBUF to the kernel's autotuning (which
    grows them up to net.ipv4.tcp_wmem/tcp_rmem max, and is what a long fat link wants);
    setting it pins both. ``peer_timeout_s`` bounds how long unacknowledged data may sit
    (TCP_USER_TIMEOUT) and drives keepalive, so a vanished host is noticed.
    """

    buffer_bytes: int | None = None
    peer_timeout_s: float = 30.0
    congestion_control: str | None = None


def dial(address: str, host: str, port: int, timeout_s: float) -> socket.socket:
    """A connected TCP socket, or PeerLostError saying why (unknown host, refused, timed out)."""
    try:
        return socket.create_connection((host, port), timeout=timeout_s)
    except socket.gaierror as exc:
        raise PeerLostError(f"cannot connect to {address}: host {host!r} not found ({exc.strerror})") from None
    except (socket.timeout, TimeoutError):
        raise PeerLostError(f"cannot connect to {address}: no answer within {timeout_s:g}s") from None
    except OSError as exc:
        raise PeerLostError(f"cannot connect to {address}: {exc.strerror or exc}") from None


def bind_listening(address: str, host: str, port: int, options: TcpOptions) -> socket.socket:
    """A listening socket on host:port, or OSError naming the address ("... in use")."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if options.buffer_bytes:  # must be set before listen() to apply to accepted sockets' window
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, options.buffer_bytes)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {address}: {exc.strerror}") from None
    sock.listen(256)
    return sock


def _tls_failed(peer: str, exc: BaseException) -> Exception:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return AuthenticationError(f"TLS certificate of {peer} rejected: {exc.verify_message}")
    return PeerLostError(f"TLS handshake with {peer} failed: {exc}")


def configure_socket(sock: socket.socket, options: TcpOptions) -> None:
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


class TcpConnection:
    """One socket. All OS errors are mapped to kvwire errors here and nowhere else."""

    backend_name = "tcp"
    takes_device_memory = False  # CUDA arrays are staged to host before they reach a socket

    def __init__(self, sock: socket.socket, peer: str):
        self.sock = sock
        self.peer = peer
        self._is_tls = isinstance(sock, ssl.SSLSocket)
        self._closed = False

    def _lost(self, exc: BaseException) -> Exception:
        if isinstance(exc, (socket.timeout, TimeoutError)):
            return TransferTimeout(f"connection to {self.peer} timed out")
        if self._closed:
            return PeerLostError(f"connection to {self.peer} was closed")
        return PeerLostError(f"connection to {self.peer} lost: {exc}")

    def send(self, buffers: Sequence[memoryview | bytes]) -> None:
        try:
            if self._is_tls:
                for buf in buffers:
                    self.sock.sendall(buf)
                return
            views = [view for view in (memoryview(b).cast("B") for b in buffers) if view.nbytes]
            while views:
                sent = self.sock.sendmsg(views[:_IOV_MAX])
                while views and sent >= len(views[0]):
                    sent -= len(views[0])
                    views.pop(0)
                if sent:
                    views[0] = views[0][sent:]
        except (OSError, ValueError) as exc:
            raise self._lost(exc) from None

    def recv_into(self, view: memoryview) -> None:
        flags = 0 if self._is_tls else socket.MSG_WAITALL
        try:
            while len(view):
                n = self.sock.recv_into(view, len(view), flags)
                if n == 0:
                    raise PeerLostError(f"connection to {self.peer} closed by the peer")
                view = view[n:]
        except (OSError, ValueError) as exc:
            raise self._lost(exc) from None

    def set_timeout(self, seconds: float | None) -> None:
        self.sock.settimeout(seconds)

    def link_stats(self) -> LinkStats | None:
        try:
            raw = self.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_BYTES)
        except (OSError, AttributeError):
            return None
        return parse_tcp_info(raw)

    def close(self) -> None:
        self._closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def parse_tcp_info(raw: bytes) -> LinkStats | None:
    """Fields of Linux's struct tcp_info (include/uapi/linux/tcp.h) that signal congestion."""
    if len(raw) < 104:
        return None
    lost, _retrans = struct.unpack_from("<II", raw, 32)
    rtt_us, rttvar_us, _ssthresh, cwnd = struct.unpack_from("<IIII", raw, 68)
    (total_retrans,) = struct.unpack_from("<I", raw, 100)
    min_rtt_us = struct.unpack_from("<I", raw, 148)[0] if len(raw) >= 152 else 0
    delivery_rate = struct.unpack_from("<Q", raw, 160)[0] if len(raw) >= 168 else 0
    bytes_retrans = struct.unpack_from("<Q", raw, 208)[0] if len(raw) >= 216 else 0
    return LinkStats(
        rtt_ms=rtt_us / 1000,
        rttvar_ms=rttvar_us / 1000,
        min_rtt_ms=min_rtt_us / 1000,
        cwnd_segments=cwnd,
        total_retrans=total_retrans,
        lost=lost,
        delivery_rate_bps=delivery_rate * 8.0,
        bytes_retrans=bytes_retrans,
    )


class TcpListener:
    def __init__(self, address: str, ssl_context: ssl.SSLContext | None, options: TcpOptions):
        host, port = parse_address(address, what="listen address", listen=True)
        self._sock = bind_listening(address, host, port, options)
        self.address = format_address(host, self._sock.getsockname()[1])
        self._ssl = ssl_context
        self._options = options
        self._closed = False

    def accept(self) -> TcpConnection | None:
        """Next raw connection; TLS handshake is left to the caller's thread (``start_tls``)."""
        while True:
            try:
                sock, addr = self._sock.accept()
            except OSError:
                if self._closed:
                    return None
                continue
            configure_socket(sock, self._options)
            return TcpConnection(sock, format_address(addr[0], addr[1]))

    def start_tls(self, conn: TcpConnection, timeout_s: float) -> TcpConnection:
        """Wrap an accepted connection in TLS (server side), if a context was given."""
        if self._ssl is None:
            return conn
        conn.sock.settimeout(timeout_s)
        try:
            tls = self._ssl.wrap_socket(conn.sock, server_side=True)
        except (OSError, ssl.SSLError) as exc:
            conn.close()
            raise _tls_failed(conn.peer, exc) from None
        return TcpConnection(tls, conn.peer)

    def close(self) -> None:
        self._closed = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()


class TcpBackend:
    name = "tcp"

    def connect(self, address: str, *, timeout_s: float, ssl_context=None, options=None) -> TcpConnection:
        options = options or TcpOptions()
        host, port = parse_address(address, what="peer address")
        sock = dial(address, host, port, timeout_s)
        configure_socket(sock, options)
        if ssl_context is not None:
            try:
                sock = ssl_context.wrap_socket(sock, server_hostname=host)
            except (OSError, ssl.SSLError) as exc:
                sock.close()
                raise _tls_failed(address, exc) from None
        return TcpConnection(sock, address)

    def listen(self, address: str, *, ssl_context=None, options=None) -> TcpListener:
        return TcpListener(address, ssl_context, options or TcpOptions())
