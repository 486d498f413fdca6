"""TCP backend: blocking sockets driven by kvwire's own I/O threads.

Payloads go from the caller's memory to the kernel with ``sendmsg`` (in C, from
``kvwire._native``, where it was built: a list of a thousand numpy arrays costs no buffer
export each), and from the kernel into their destination with ``recv_into(MSG_WAITALL)``:
no Python-level copies, and the GIL is released for the whole syscall. TLS (an
``ssl.SSLContext``) uses the same code with ``sendall`` per buffer, since SSL sockets have
no ``sendmsg``.
"""

from __future__ import annotations

import socket
import ssl
import struct
from dataclasses import replace
from typing import Sequence

from .. import native
from ..address import parse_address
from ..errors import AuthenticationError, PeerLostError, TransferTimeout
from .base import Capabilities, LinkStats, TcpOptions, check_options
from .sockets import ListeningSocket, configure_socket, dial

__all__ = ["TcpBackend", "TcpConnection", "TcpListener", "TcpOptions", "parse_tcp_info"]

_IOV_MAX = 1024
_TCP_INFO_BYTES = 232


def _views(buffers: Sequence[memoryview | bytes]) -> list[memoryview]:
    """The non-empty buffers as flat byte views, in order."""
    return [view for view in (memoryview(b).cast("B") for b in buffers) if view.nbytes]


def _consume(views: list[memoryview], nbytes: int) -> None:
    """Drop the first ``nbytes`` of ``views`` (sent or received): whole views, then the
    front of the next one."""
    while views and nbytes >= len(views[0]):
        nbytes -= len(views[0])
        views.pop(0)
    if nbytes:
        views[0] = views[0][nbytes:]


def _tls_failed(peer: str, exc: BaseException) -> Exception:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return AuthenticationError(f"TLS certificate of {peer} rejected: {exc.verify_message}")
    return PeerLostError(f"TLS handshake with {peer} failed: {exc}")


class TcpConnection:
    """One socket. All OS errors are mapped to kvwire errors here and nowhere else."""

    # CUDA arrays are staged to host before they reach a socket; the kernel's TCP_INFO
    # gives the RTT a Sender sizes its streams by.
    # (a TLS socket has no sendmsg and buffers records of its own: it is not ``nonblocking``)
    capabilities = Capabilities("tcp", device_memory=False, link_stats=hasattr(socket, "TCP_INFO"),
                                partial_reads=True, nonblocking=True,
                                writes_many_buffers=native.send_pieces is not None)

    def __init__(self, sock: socket.socket, peer: str):
        self.sock = sock
        self.peer = peer
        self._is_tls = isinstance(sock, ssl.SSLSocket)
        if self._is_tls:
            self.capabilities = _TLS_CAPABILITIES
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
            if native.send_pieces is not None and self.sock.gettimeout() is None:
                native.send_pieces(self.sock.fileno(), list(buffers), 0, 0, 0)
                return
            self._write(_views(buffers), 0)
        except (OSError, ValueError) as exc:
            raise self._lost(exc) from None

    def send_now(self, buffers: Sequence[memoryview | bytes]) -> list[memoryview]:
        """Write what the socket buffer takes now (MSG_DONTWAIT); the views left. Nothing is
        written on a socket with a timeout (Python would wait out the timeout instead)."""
        if self._is_tls or self.sock.gettimeout() is not None:
            return _views(buffers)
        if native.send_pieces is not None:
            pieces = list(buffers)
            try:
                index, offset = native.send_pieces(self.sock.fileno(), pieces, 0, 0, socket.MSG_DONTWAIT)
            except (OSError, ValueError) as exc:
                raise self._lost(exc) from None
            if index == len(pieces):
                return []
            return [memoryview(pieces[index]).cast("B")[offset:], *pieces[index + 1 :]]
        views = _views(buffers)
        try:
            self._write(views, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            pass
        except (OSError, ValueError) as exc:
            raise self._lost(exc) from None
        return views

    def _write(self, views: list[memoryview], flags: int) -> None:
        """``sendmsg`` until ``views`` is empty; what is written leaves ``views`` (so that,
        when a non-blocking write stops, ``views`` holds what is left)."""
        while views:
            _consume(views, self.sock.sendmsg(views[:_IOV_MAX], (), flags))

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

    def recv_into_many(self, buffers: Sequence[memoryview]) -> None:
        """Fill every buffer, in order: one ``recvmsg`` for all of them where the socket
        allows (not TLS), instead of a receive, and a trip through the GIL, per buffer."""
        if self._is_tls:
            for buf in buffers:
                self.recv_into(memoryview(buf).cast("B"))
            return
        views = _views(buffers)
        try:
            while views:
                n = self.sock.recvmsg_into(views[:_IOV_MAX], 0, socket.MSG_WAITALL)[0]
                if n == 0:
                    raise PeerLostError(f"connection to {self.peer} closed by the peer")
                _consume(views, n)
        except (OSError, ValueError) as exc:
            raise self._lost(exc) from None

    def recv_some(self, view: memoryview) -> int:
        """Receive what has arrived, at least one byte, at most ``len(view)``."""
        try:
            n = self.sock.recv_into(view, len(view))
        except (OSError, ValueError) as exc:
            raise self._lost(exc) from None
        if n == 0:
            raise PeerLostError(f"connection to {self.peer} closed by the peer")
        return n

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


_TLS_CAPABILITIES = replace(TcpConnection.capabilities, nonblocking=False, writes_many_buffers=False)


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
        self._port = ListeningSocket(address, options)
        self.address = self._port.address
        self._ssl = ssl_context

    def accept(self) -> TcpConnection | None:
        """Next raw connection; TLS handshake is left to the caller's thread (``start_tls``)."""
        accepted = self._port.accept()
        return None if accepted is None else TcpConnection(*accepted)

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
        self._port.close()


class TcpBackend:
    name = "tcp"
    options_type = TcpOptions

    def connect(self, address: str, *, timeout_s: float, ssl_context=None, options=None) -> TcpConnection:
        options = check_options(self.name, options, self.options_type)
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
        return TcpListener(address, ssl_context, check_options(self.name, options, self.options_type))
