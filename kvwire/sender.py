"""Sender: connects ``streams`` connections to a Receiver and stripes requests over them.

Each connection has a writer thread, which takes the next chunk from one shared queue
(so faster connections carry more), and a reader thread for the receiver's acks and
aborts. Every stream carries each request's Open before any of its data, so the
receiver never waits on one connection for another.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
import weakref
from dataclasses import dataclass, field, replace

from . import device
from .address import check_address
from .arguments import check_layout, check_positive, check_secret
from .codecs import CODECS, choose_codec
from .errors import (
    AuthenticationError,
    KVWireError,
    LayoutMismatchError,
    PeerLostError,
    ProtocolError,
    RequestRejected,
    TransferTimeout,
    again,
    error_from_kind,
    kind_of,
)
from .handshake import client_handshake
from .layout import KVLayout
from .metrics import PeerCounters, PeerMetrics
from .outbound import Transfer
from .protocol import MONOTONIC, RequestPlan
from .transport import Connection, get_backend
from .transport.base import tcp_settings, with_tcp_settings
from .transport.tuning import HostLimits, LinkEstimate, Tuning, choose, resolve_congestion_control
from .wire import framing
from .wire.checksum import frame_checksum
from .wire.messages import Abort, Ack, Data

log = logging.getLogger(__name__)

DEFAULT_CHUNK_BYTES = 4 << 20
# Chunks where every connection takes CUDA memory as is. On an H100 over UCX cuda_ipc,
# 4 layers of 64 MiB moved at 2.2-2.6 GB/s in 4 MiB chunks, 7-9 in 16 MiB and 23-33 in
# 64 MiB (perf/results/gpu_chunks.json): each chunk pays costs that do not shrink with
# it (kernel launches, the digests' copy to host, stream synchronizations, thread
# hand-offs) at both ends. The price: a chunk spanning several tensors is joined in a
# new device buffer of its size at the sender, and received into a device landing
# buffer of its size (one per connection) before it is copied into the receiver's
# buffers; a chunk bound for one CUDA buffer lands there directly.
DEVICE_CHUNK_BYTES = 64 << 20


@dataclass(eq=False)
class _Stream:
    index: int
    conn: Connection
    control: list = field(default_factory=list)
    alive: bool = True


class Sender:
    """Sends KV of ``layout`` to the Receiver at ``address``, layer by layer.

    Parameters
    ----------
    layout : KVLayout
        Must equal the receiver's; the constructor raises LayoutMismatchError otherwise.
    address : str
        The receiver's ``"HOST:PORT"`` (``Receiver.address``).
    backend : str
        ``"tcp"`` (more with the optional extras).
    streams : int, optional
        Connections to open; frames stripe across them. Several streams fill long fat
        links that one TCP stream cannot. None (the default): the first connection
        measures the RTT, and ``kvwire.transport.tuning.choose`` decides how many to open
        from it, ``link_bandwidth_bps``, ``link_loss`` and this host's TCP limits (the
        decision and its reason: ``Sender.tuning``). A UCX connection stays alone (UCX
        spreads one endpoint over its own lanes: its ``Capabilities.default_streams`` is 1).
    link_bandwidth_bps, link_loss : float, optional
        What is known of the path, for ``streams=None`` (unknown: 10 Gbit/s, 0.1% loss).
        ``transport_options=TcpOptions(congestion_control="auto")`` also lets it pick bbr.
    secret : bytes, optional
        Shared secret for the mutual HMAC handshake; AuthenticationError on mismatch.
    ssl_context : ssl.SSLContext, optional
        Client-side TLS context.
    timeout : float
        Seconds allowed to connect and complete the handshake.
    chunk_bytes : int, optional
        Frame payload size; each frame is checksummed and acked per layer. By default
        each ``open()`` takes ``DEVICE_CHUNK_BYTES`` (64 MiB) while every connection takes
        CUDA memory as is (UCX that opened cuda_copy: a machine with a GPU; also for
        host-memory layers there), else ``DEFAULT_CHUNK_BYTES`` (4 MiB; always under
        numba's simulator, whose device memory is host memory).
    max_queued_chunks : int
        Bound on chunks waiting for a connection (``send_layer`` blocks beyond it).
    resume_window_s : float
        How long to keep reconnecting a dropped connection. Meanwhile requests go on over
        the other connections, and everything not yet acked is re-sent, so a drop costs
        at most the un-acked layers, not the request. A receiver that refuses the
        connection (process gone) fails requests at once, when no connection is left.
    """

    def __init__(
        self,
        layout: KVLayout,
        address: str,
        *,
        backend: str = "tcp",
        streams: int | None = None,
        secret: bytes | None = None,
        ssl_context=None,
        timeout: float = 10.0,
        chunk_bytes: int | None = None,
        max_queued_chunks: int = 4096,
        resume_window_s: float = 10.0,
        transport_options=None,
        link_bandwidth_bps: float | None = None,
        link_loss: float | None = None,
    ):
        check_layout(layout, "Sender")
        secret = check_secret(secret, "Sender")
        check_positive("Sender", timeout=timeout, max_queued_chunks=max_queued_chunks)
        if resume_window_s < 0:
            raise ValueError(f"Sender: resume_window_s must be >= 0, got {resume_window_s!r}")
        if streams is not None and not 1 <= streams <= 1024:
            raise ValueError(f"streams must be in 1..1024, got {streams}")
        if chunk_bytes is not None and not 4096 <= chunk_bytes <= 1 << 30:
            raise ValueError(f"chunk_bytes must be in 4096..2**30, got {chunk_bytes}")
        self.layout = layout
        self.address = check_address(address, what="Sender address")
        self._chunk_bytes = chunk_bytes
        self._clock = MONOTONIC  # request deadlines are read from it (a FakeClock in tests)
        self._max_queued = max_queued_chunks
        self._cv = threading.Condition()
        self._queue: collections.deque = collections.deque()
        self._transfers: dict[int, Transfer] = {}
        self._next_rid = 0
        self._closing = False
        self._counters = PeerCounters()
        self._backend = get_backend(backend)
        self._secret, self._ssl_context, self._timeout, self._options = secret, ssl_context, timeout, transport_options
        self._resume_window_s = resume_window_s
        self._session_id = os.urandom(16)
        self._num_streams = streams
        self._reconnecting: set[int] = set()
        self._threads: list[threading.Thread] = []
        self.tuning: Tuning | None = None
        host = HostLimits.read()
        tcp = tcp_settings(transport_options)
        if tcp is not None and tcp.congestion_control == "auto":
            tcp = replace(tcp, congestion_control=resolve_congestion_control("auto", host))
            self._options = with_tcp_settings(transport_options, tcp)
        if streams is None:
            conns, welcome = self._connect_tuned(host, link_bandwidth_bps, link_loss)
        else:
            conns, welcome = self._connect_all()
        self.max_request_bytes = welcome.max_request_bytes
        self._streams = [_Stream(i, conn) for i, conn in enumerate(conns)]
        self._conns = [s.conn for s in self._streams]  # every connection ever made, for the finalizer
        for stream in self._streams:
            self._start_threads(stream)
        self._finalizer = weakref.finalize(self, Sender._shutdown, self._conns)

    def _start_threads(self, stream: _Stream) -> None:
        for role, target in (("tx", self._write_loop), ("ack", self._read_loop)):
            thread = threading.Thread(target=target, args=(stream,), name=f"kvwire-{role}{stream.index}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def _dial(self, index: int, *, resume: bool):
        """Connect and handshake stream ``index``; (connection, Welcome) or a kvwire error."""
        conn = self._backend.connect(
            self.address, timeout_s=self._timeout, ssl_context=self._ssl_context, options=self._options
        )
        try:
            conn.set_timeout(self._timeout)
            welcome = client_handshake(
                conn,
                layout=self.layout,
                secret=self._secret,
                session_id=self._session_id,
                stream_index=index,
                num_streams=self._num_streams,
                resume=resume,
                timeout_s=self._timeout,
            )
            conn.set_timeout(None)
        except KVWireError:
            conn.close()
            raise
        return conn, welcome

    def _connect_tuned(self, host: HostLimits, bandwidth_bps: float | None, loss: float | None):
        """One connection measures the RTT; the tuning policy decides how many to open in all."""
        self._num_streams = 1
        first, welcome = self._connect_all()
        capabilities = first[0].capabilities
        stats = first[0].link_stats() if capabilities.link_stats else None
        if stats is None:
            self._num_streams = capabilities.default_streams
            log.info("streams to %s: %d (%s connection)", self.address, self._num_streams, capabilities.backend)
        else:
            link = LinkEstimate(rtt_s=(stats.min_rtt_ms or stats.rtt_ms) / 1000, bandwidth_bps=bandwidth_bps, loss=loss)
            tcp = tcp_settings(self._options)
            self.tuning = choose(
                link,
                host,
                buffer_bytes=None if tcp is None else tcp.buffer_bytes,
                congestion_control=None if tcp is None else tcp.congestion_control,
            )
            log.info("streams to %s: %s", self.address, self.tuning.reason)
            self._num_streams = self.tuning.num_streams
            if tcp is not None and self.tuning.buffer_bytes != tcp.buffer_bytes:
                self._options = with_tcp_settings(self._options, replace(tcp, buffer_bytes=self.tuning.buffer_bytes))
        try:
            rest, _ = self._connect_all(first_index=1)
        except KVWireError:
            first[0].close()
            raise
        return first + rest, welcome

    def _connect_all(self, first_index: int = 0):
        """All streams at once (a WAN handshake costs round trips; do them in parallel)."""
        indices = range(first_index, self._num_streams)
        results: list = [None] * len(indices)

        def one(slot: int, index: int) -> None:
            try:
                results[slot] = self._dial(index, resume=False)
            except Exception as exc:  # any error reaches the caller as itself, not as a missing result
                results[slot] = exc

        threads = [threading.Thread(target=one, args=pair, daemon=True) for pair in enumerate(indices)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        errors = [r for r in results if isinstance(r, Exception)]
        if errors:
            for result in results:
                if isinstance(result, tuple):
                    result[0].close()
            decisive = (AuthenticationError, LayoutMismatchError, ProtocolError, ValueError, TypeError)
            raise next((e for e in errors if isinstance(e, decisive)), errors[0])
        return [conn for conn, _ in results], (results[0][1] if results else None)

    # -- engine API ---------------------------------------------------------------------

    def open(
        self,
        request_id: str,
        num_tokens: int,
        *,
        codec: str = "none",
        timeout: float = 60.0,
        prefill_s: float | None = None,
    ) -> Transfer:
        """Start sending a request of ``num_tokens`` tokens; returns its Transfer.

        ``codec``: "none" (bit-exact), "fp8", "int8", "int4" (see kvwire.codecs), or
        "auto", which picks the least lossy codec that keeps this peer's measured goodput
        from becoming the bottleneck for KV produced over ``prefill_s`` seconds (see
        ``choose_codec``). ``timeout`` is the request's deadline in seconds: both sides
        give up on it (TransferTimeout) if it has not completed by then.
        """
        if not isinstance(request_id, str) or not 0 < len(request_id) <= 256:
            raise ValueError(f"request_id must be a non-empty str of at most 256 characters, got {request_id!r}")
        if not isinstance(num_tokens, int) or num_tokens < 0:
            raise ValueError(f"num_tokens must be a non-negative int, got {num_tokens!r}")
        if not 0 < timeout <= 7 * 24 * 3600:
            raise ValueError(f"timeout must be in (0, 604800] seconds, got {timeout}")
        if codec == "auto":
            codec = self.choose_codec(num_tokens, prefill_s)
        plan = RequestPlan(self.layout, num_tokens, codec, self.chunk_bytes)  # checks the codec against the layout
        need = plan.receive_bytes
        if need > self.max_request_bytes:
            raise RequestRejected(
                f"request {request_id!r} needs {need} bytes, more than the receiver's budget of {self.max_request_bytes}"
            )
        with self._cv:
            live = [s for s in self._streams if s.alive]
            if self._closing or not live:
                raise PeerLostError(f"no live connection to {self.address}")
            rid = self._next_rid
            self._next_rid += 1
            xfer = Transfer(self, request_id, rid, plan, timeout, clock=self._clock)
            self._transfers[rid] = xfer
            opening = xfer.opening = plan.open_message(rid, request_id, timeout)
            for stream in live:
                stream.control.append(opening)
            self._cv.notify_all()
        return xfer

    def choose_codec(self, num_tokens: int, prefill_s: float | None) -> str:
        """The codec ``codec="auto"`` would pick now for a request of ``num_tokens``."""
        if prefill_s is None:
            raise ValueError("codec='auto' needs prefill_s: the seconds over which the prefill produces this KV")
        metrics = self.metrics()
        goodput = metrics.goodput_bps or sum(link.delivery_rate_bps for link in metrics.links)
        wire = {name: self.layout.wire_bytes(num_tokens, name) for name in CODECS}
        name, reason = choose_codec(wire, prefill_s, goodput)
        log.info("codec for %d tokens to %s: %s (%s)", num_tokens, self.address, name, reason)
        return name

    def metrics(self) -> PeerMetrics:
        """Bytes, goodput EWMA, and each live connection's TCP_INFO (rtt, retransmits)."""
        links = tuple(filter(None, (s.conn.link_stats() for s in self._streams if s.alive)))
        return self._counters.snapshot(self.address, links)

    @property
    def takes_device_memory(self) -> bool:
        """Whether CUDA tensors go out as they are (every connection is UCX that opened
        cuda_copy, or runs under numba's simulator); otherwise they are staged to host
        memory first."""
        return bool(self._streams) and all(s.conn.capabilities.device_memory for s in self._streams)

    @property
    def chunk_bytes(self) -> int:
        """Payload bytes per frame of the next request (see the ``chunk_bytes`` parameter)."""
        if self._chunk_bytes is not None:
            return self._chunk_bytes
        on_gpu = self.takes_device_memory and not device.simulated()
        return DEVICE_CHUNK_BYTES if on_gpu else DEFAULT_CHUNK_BYTES

    @property
    def backend_names(self) -> list[str]:
        """The backend carrying each live connection ("tcp" or "ucx"); differs under backend="auto"."""
        return [s.conn.capabilities.backend for s in self._streams if s.alive]

    @property
    def num_streams(self) -> int:
        """Connections still alive."""
        return sum(s.alive for s in self._streams)

    def close(self) -> None:
        """Close every connection; requests not finished fail with PeerLostError."""
        with self._cv:
            if self._closing:
                return
            self._closing = True
            transfers = list(self._transfers.values())
            self._cv.notify_all()
        for xfer in transfers:
            xfer._fail(PeerLostError(f"request {xfer.request_id!r}: sender closed"))
        self._finalizer()
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(timeout=5)

    def __enter__(self) -> "Sender":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @staticmethod
    def _shutdown(conns: list) -> None:
        for conn in list(conns):
            conn.close()

    # -- queue and I/O threads ----------------------------------------------------------

    def _enqueue(self, xfer: Transfer, layer: int, num_chunks: int) -> None:
        for chunk in range(num_chunks):
            with self._cv:
                ok = self._cv.wait_for(
                    lambda: len(self._queue) < self._max_queued or xfer.error is not None,
                    max(0.0, xfer.deadline - self._clock.now()),
                )
                if xfer.error is not None:
                    raise again(xfer.error)
                if not ok:
                    raise TransferTimeout(f"request {xfer.request_id!r}: send queue stayed full until the deadline")
                self._queue.append((xfer, layer, chunk, False))
                self._cv.notify_all()

    def _aborted(self, xfer: Transfer, error: KVWireError) -> None:
        """Tell the receiver (on one live stream) that we gave up on ``xfer``."""
        with self._cv:
            self._transfers.pop(xfer.rid, None)
            live = [s for s in self._streams if s.alive]
            if live:
                live[0].control.append(Abort(xfer.rid, kind_of(error), str(error)))
            self._cv.notify_all()
        self._counters.failed()

    def _write_loop(self, stream: _Stream) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(lambda: stream.control or self._queue or self._closing or not stream.alive)
                if self._closing or not stream.alive:
                    return
                controls, stream.control = stream.control, []
                item = self._queue.popleft() if self._queue else None
                self._cv.notify_all()
            frame = self._data_frame(stream, *item) if item is not None else None
            buffers = [framing.encode(message) for message in controls] + (frame[0] if frame else [])
            # Counted before it goes: the receiver's ack (and finish()) may beat this thread back.
            # A send that fails still counts, and its re-send counts again, as resent.
            if frame:
                xfer, layer, _, resend = item
                xfer._chunk_written(layer, frame[1], resend)
                self._counters.add_bytes(frame[1])
            try:
                if buffers:
                    stream.conn.send(buffers)  # control messages and the chunk in one syscall
            except KVWireError as exc:
                return self._stream_lost(stream, exc)
            # Waiting for the next chunk, this thread must not keep the last one's arrays
            # (the engine's, borrowed only until finish()) alive.
            item = frame = buffers = xfer = None

    def _data_frame(
        self, stream: _Stream, xfer: Transfer, layer: int, chunk: int, resend: bool
    ) -> tuple[list, int] | None:
        """(buffers, payload bytes) of one Data frame, or None if it need not go.

        A chunk of CUDA tensors is checksummed on the GPU (blocksum) and goes out from
        device memory, or, on a connection that cannot take it (TCP after ``auto`` fell
        back), as a host copy.
        """
        if xfer.error is not None or xfer.layer_sent(layer):
            return None
        try:
            pieces, nbytes = xfer.chunk(layer, chunk)
            if any(device.is_device(piece) for piece in pieces):
                payload = device.join(pieces, nbytes)
                checksum, algorithm = device.frame_blocksum(xfer.rid, layer, chunk, payload), "blocksum"
                pieces = [payload if stream.conn.capabilities.device_memory else device.to_host(payload)]
            else:
                checksum, algorithm = frame_checksum(xfer.rid, layer, chunk, pieces, nbytes), "xxh3"
        except Exception as exc:  # a bug must fail its request, never kill the stream silently
            log.exception("building layer %d chunk %d of request %r failed", layer, chunk, xfer.request_id)
            xfer._abort(KVWireError(f"request {xfer.request_id!r}: internal error building a frame: {exc!r}"))
            return None
        return [framing.encode(Data(xfer.rid, layer, chunk, nbytes, checksum, algorithm)), *pieces], nbytes

    def _read_loop(self, stream: _Stream) -> None:
        prefix = memoryview(bytearray(framing.PREFIX_BYTES))
        header = memoryview(bytearray(framing.MAX_STREAM_HEADER_BYTES))
        try:
            while True:
                stream.conn.recv_into(prefix)
                length = framing.header_length(prefix, framing.MAX_STREAM_HEADER_BYTES)
                stream.conn.recv_into(header[:length])
                message = framing.decode_stream(header[:length])
                if isinstance(message, Ack):
                    self._on_ack(message)
                elif isinstance(message, Abort):
                    self._on_abort(message)
                else:
                    raise ProtocolError(f"a receiver may not send {type(message).__name__} messages")
        except KVWireError as exc:
            self._stream_lost(stream, exc)

    def _on_ack(self, msg: Ack) -> None:
        xfer = self._transfers.get(msg.rid)
        if xfer is not None and 0 <= msg.layer < xfer.num_layers and xfer._layer_acked(msg.layer, self._completed):
            with self._cv:
                self._transfers.pop(msg.rid, None)

    def _completed(self, stats) -> None:
        self._counters.completed(stats.wire_bytes, stats.seconds)

    def _on_abort(self, msg: Abort) -> None:
        with self._cv:
            xfer = self._transfers.pop(msg.rid, None)
        if xfer is not None:
            error = error_from_kind(
                msg.kind, f"receiver at {self.address} failed request {xfer.request_id!r}: {msg.reason}"
            )
            if xfer._fail(error):
                self._counters.failed()

    def _stream_lost(self, stream: _Stream, reason: KVWireError) -> None:
        """A connection broke: re-send everything not acked, and reconnect it."""
        with self._cv:
            if not stream.alive:
                return
            stream.alive = False
            closing = self._closing
            self._cv.notify_all()
        stream.conn.close()
        if closing:
            return
        log.warning("connection %d to %s lost: %s; resuming", stream.index, self.address, reason)
        if self.num_streams:
            self._requeue_unacked()  # the other connections carry it now
        with self._cv:
            if stream.index in self._reconnecting:
                return
            self._reconnecting.add(stream.index)
        thread = threading.Thread(
            target=self._reconnect, args=(stream.index, reason), name=f"kvwire-reconnect{stream.index}", daemon=True
        )
        thread.start()
        self._threads.append(thread)

    def _requeue_unacked(self) -> None:
        """Put every chunk of every sent-but-unacked layer back at the head of the queue:
        the receiver keeps what it verified and ignores repeats, so nothing restarts."""
        with self._cv:
            unacked = {
                (xfer, layer)
                for xfer in self._transfers.values()
                if xfer.error is None
                for layer in xfer._unacked_layers()
            }
            kept = [item for item in self._queue if (item[0], item[1]) not in unacked]
            items = [
                (xfer, layer, chunk, True)
                for xfer, layer in sorted(unacked, key=lambda pair: (pair[0].rid, pair[1]))
                for chunk in range(xfer.num_chunks[layer])
            ]
            self._queue.clear()
            self._queue.extend(items + kept)
            self._cv.notify_all()

    def _reconnect(self, index: int, reason: KVWireError) -> None:
        deadline = time.monotonic() + self._resume_window_s
        delay = 0.05
        try:
            while not self._closing and time.monotonic() < deadline:
                try:
                    conn, welcome = self._dial(index, resume=True)
                except (AuthenticationError, LayoutMismatchError, ProtocolError) as exc:
                    return self._fail_in_flight(
                        f"connection {index} to {self.address} lost ({reason}); reconnecting was refused: {exc}"
                    )
                except KVWireError as exc:
                    if self.num_streams == 0 and "refused" in str(exc):
                        self._fail_in_flight(
                            f"connection {index} to {self.address} lost ({reason}); the receiver refuses connections"
                        )
                    time.sleep(delay)
                    delay = min(delay * 2, 1.0)
                    continue
                if not welcome.session_known:
                    self._fail_in_flight(
                        f"receiver at {self.address} no longer holds this sender's requests (restarted?)"
                    )
                self._resumed(index, conn)
                return
            if self.num_streams == 0:
                self._fail_in_flight(
                    f"connection {index} to {self.address} lost ({reason}); no reconnect within {self._resume_window_s}s"
                )
        finally:
            with self._cv:
                self._reconnecting.discard(index)

    def _resumed(self, index: int, conn: Connection) -> None:
        with self._cv:
            if self._closing:
                conn.close()
                return
            stream = _Stream(index, conn)
            stream.control = [xfer.opening for xfer in self._transfers.values()]  # Opens precede data on every stream
            self._streams[index] = stream
            self._conns.append(conn)
            self._cv.notify_all()
        log.info("connection %d to %s resumed", index, self.address)
        self._start_threads(stream)
        if self.num_streams == 1:  # nothing carried the un-acked layers while all were down
            self._requeue_unacked()

    def _fail_in_flight(self, why: str) -> None:
        with self._cv:
            transfers = list(self._transfers.values())
            self._transfers.clear()
            self._cv.notify_all()
        for xfer in transfers:
            if xfer._fail(PeerLostError(f"request {xfer.request_id!r}: {why}")):
                self._counters.failed()
