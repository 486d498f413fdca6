"""The narrow interface every backend implements: connect, listen, send, recv_into."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence


@dataclass(frozen=True)
class LinkStats:
    """The kernel's (or UCX's) view of one connection: its congestion signals."""

    rtt_ms: float
    rttvar_ms: float
    min_rtt_ms: float
    cwnd_segments: int
    total_retrans: int
    lost: int
    delivery_rate_bps: float
    bytes_retrans: int


class Connection(Protocol):
    """One reliable, ordered byte stream to a peer.

    Backends raise only kvwire errors: PeerLostError when the stream breaks,
    TransferTimeout when a timeout set with ``set_timeout`` passes.
    """

    peer: str
    takes_device_memory: bool  # CUDA arrays may be passed to send/recv_into as they are

    def send(self, buffers: Sequence[memoryview | bytes]) -> None:
        """Write all buffers, in order, or raise."""

    def recv_into(self, view: memoryview) -> None:
        """Fill ``view`` exactly, or raise."""

    def set_timeout(self, seconds: float | None) -> None:
        """Timeout of each later send/recv (None blocks)."""

    def link_stats(self) -> LinkStats | None:
        """Congestion signals, where the backend can read them."""

    def close(self) -> None:
        """Close now; a thread blocked in send/recv_into wakes with PeerLostError."""


class Listener(Protocol):
    address: str

    def accept(self) -> Connection | None:
        """The next connection, or None once the listener is closed."""

    def start_tls(self, conn: Connection, timeout_s: float) -> Connection:
        """Secure an accepted connection (in its own thread); identity if no TLS."""

    def close(self) -> None: ...


class Backend(Protocol):
    name: str

    def connect(self, address: str, *, timeout_s: float, ssl_context=None, options=None) -> Connection: ...

    def listen(self, address: str, *, ssl_context=None, options=None) -> Listener: ...
