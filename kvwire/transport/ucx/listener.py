"""A UCX listener: a TCP port for bootstraps, each run later in its connection's thread."""

from __future__ import annotations

import socket

from ..base import TcpOptions, UcxOptions
from ..sockets import ListeningSocket
from .bootstrap import accept_bootstrap
from .connection import UcxConnection
from .hub import Hub


class _Pending:
    """An accepted TCP connection whose UCX bootstrap runs later, in its own thread."""

    def __init__(self, sock: socket.socket, peer: str):
        self.sock = sock
        self.peer = peer

    def set_timeout(self, seconds: float | None) -> None:
        self.sock.settimeout(seconds)

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


class UcxListener:
    """A TCP port for bootstraps; ``start_tls`` (per connection thread) does the UCX part."""

    def __init__(self, address: str, options: UcxOptions):
        self._port = ListeningSocket(address, TcpOptions(peer_timeout_s=options.peer_timeout_s))
        self.address = self._port.address
        self._options = options
        Hub.get(options)  # fail at listen(), not at the first peer, when UCX cannot start

    def accept(self) -> _Pending | None:
        accepted = self._port.accept()
        return None if accepted is None else _Pending(*accepted)

    def start_tls(self, conn: _Pending, timeout_s: float) -> UcxConnection:
        """Run the UCX bootstrap of an accepted connection (no TLS over UCX)."""
        return accept_bootstrap(conn.sock, conn.peer, self._options, timeout_s)

    def close(self) -> None:
        self._port.close()
