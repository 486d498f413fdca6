"""The narrow interface every backend implements: connect, listen, send, recv_into; what
each connection can do (``Capabilities``), and each backend's options."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

UNTUNED_STREAMS = 4  # streams a Sender opens when not told, where it cannot measure the link


@dataclass(frozen=True)
class Capabilities:
    """What a connection can do, declared by its backend (and, before any connection, what
    a backend offers on this host: ``ucx.local_capabilities``). The Sender, the Receiver
    and ``auto`` decide from this record, never by probing a connection's attributes.

    ``device_memory``: CUDA arrays may be handed to ``send``/``recv_into`` as they are
    (otherwise they are staged through host memory). ``default_streams``: connections a
    Sender opens when it was not told how many and cannot measure the link.
    ``link_stats``: ``link_stats()`` reads the kernel's congestion signals (TCP_INFO), which
    let a Sender choose its number of streams. ``fabrics``: RDMA-class transports the two
    ends share (UCX). ``shared_memory``: the two ends are on one host and move bytes through
    shared memory / CMA / cuda_ipc (UCX). ``partial_reads``: ``recv_some`` returns what has
    arrived (TCP), so a reader can take many small frames in one receive. ``nonblocking``:
    ``send_now`` never waits (a plain TCP socket writes what its buffer takes; UCX posts a
    request's Open and leaves layers to the writer, which joins them into one message), so
    an engine's thread may write those itself while the stream is idle (one thread
    hand-off less each). ``writes_many_buffers``: ``send`` writes a list of thousands of
    small buffers at C speed (TCP: ``sendmsg`` with up to 1,024 at a time, from
    ``kvwire._native``), so a Sender hands a layer of many small tensors over unjoined.
    """

    backend: str
    device_memory: bool = False
    default_streams: int = UNTUNED_STREAMS
    link_stats: bool = False
    fabrics: tuple[str, ...] = ()
    shared_memory: bool = False
    partial_reads: bool = False
    nonblocking: bool = False
    writes_many_buffers: bool = False


@dataclass(frozen=True)
class TcpOptions:
    """Per-socket settings of the TCP backend.

    ``buffer_bytes=None`` leaves SO_SNDBUF/SO_RCVBUF to the kernel's autotuning (which
    grows them up to net.ipv4.tcp_wmem/tcp_rmem max, and is what a long fat link wants);
    setting it pins both. ``peer_timeout_s`` bounds how long unacknowledged data may sit
    (TCP_USER_TIMEOUT) and drives keepalive, so a vanished host is noticed.
    """

    buffer_bytes: int | None = None
    peer_timeout_s: float = 30.0
    congestion_control: str | None = None


@dataclass(frozen=True)
class UcxOptions:
    """Settings of the UCX backend.

    ``shared_memory``: let peers on the same host use shared memory / CMA / cuda_ipc (their
    endpoints run without UCX error handling; the liveness socket catches a dead peer). Off
    by default: a peer SIGKILLed mid-transfer can then abort or stall this process (see
    kvwire/transport/ucx). Both sides must set it.
    ``inline_bytes``: buffers smaller than this travel inside the control message (copied
    at both ends, but one message instead of one rendezvous each: perf requests, whose
    hybrid layers hold 64 KiB recurrent states, went from 279 to 464 requests/s when this
    went from 16 to 128 KiB, one run each over UCX's tcp transport).
    ``send_window_bytes``: bytes a connection's ``send`` may leave in flight, besides its
    own, before it waits (0: every send waits until the peer has taken its bytes).
    ``peer_timeout_s``: keepalive of the liveness socket, and the limit of the UCX ping.
    ``ucx_config``: ``(("TLS", "tcp"), ...)`` UCX settings (names without the ``UCX_``
    prefix) for the process's UCX context, applied when the first UCX connection of the
    process is made (over ``UCX_*`` environment variables, and over kvwire's own defaults:
    ``ucx.tuned_defaults``).
    """

    shared_memory: bool = False
    inline_bytes: int = 128 * 1024
    send_window_bytes: int = 16 << 20
    peer_timeout_s: float = 30.0
    ucx_config: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class AutoOptions:
    """Options for each backend ``auto`` may pick; ``ucx_timeout_s`` caps the UCX attempt.

    ``ucx_over_tcp``: use UCX even where it has no fabric to offer (no RDMA transport here,
    no shared memory with the peer), i.e. where UCX would carry the bytes over its own tcp
    transport. Off by default: it is slower than kvwire's TCP backend (perf/README.md,
    "Measurements behind the code") and has no TLS.
    """

    tcp: TcpOptions = field(default_factory=TcpOptions)
    ucx: UcxOptions = field(default_factory=UcxOptions)
    ucx_timeout_s: float = 5.0
    ucx_over_tcp: bool = False


def check_options(backend: str, options, *types: type):
    """``options`` if it is one of ``types`` (None: the first type's defaults), else a
    TypeError naming the backend and what it takes."""
    if options is None:
        return types[0]()
    if not isinstance(options, types):
        takes = " or ".join(t.__name__ for t in types)
        raise TypeError(f"the {backend} backend takes {takes}, got {type(options).__name__}")
    return options


def tcp_settings(options) -> TcpOptions | None:
    """The TCP settings inside a backend's options: TcpOptions itself, AutoOptions' ``tcp``;
    None where none were given or the options are UCX's."""
    if isinstance(options, AutoOptions):
        return options.tcp
    return options if isinstance(options, TcpOptions) else None


def with_tcp_settings(options, tcp: TcpOptions):
    """``options`` with its TCP settings replaced (see ``tcp_settings``)."""
    return replace(options, tcp=tcp) if isinstance(options, AutoOptions) else tcp


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
    capabilities: Capabilities

    def send(self, buffers: Sequence[memoryview | bytes]) -> None:
        """Write all buffers, in order, or raise."""

    def recv_into(self, view: memoryview) -> None:
        """Fill ``view`` exactly, or raise."""

    def send_now(self, buffers: Sequence[memoryview | bytes]) -> list[memoryview]:
        """Write what the connection takes without waiting; what is left, in order (empty:
        all written). Only where ``capabilities.nonblocking``."""

    def recv_into_many(self, buffers: Sequence[memoryview]) -> None:
        """Fill each host buffer exactly, in order, or raise."""

    def recv_some(self, view: memoryview) -> int:
        """Receive at least one byte into ``view``; how many. Only where
        ``capabilities.partial_reads``."""

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
    options_type: type  # what ``options`` of connect/listen takes (None: its defaults)

    def connect(self, address: str, *, timeout_s: float, ssl_context=None, options=None) -> Connection: ...

    def listen(self, address: str, *, ssl_context=None, options=None) -> Listener: ...
