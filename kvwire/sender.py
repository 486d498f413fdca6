"""Sender: connects ``streams`` connections to a Receiver and stripes requests over them.

This is the driver: it dials, runs a writer and a reader thread per connection, and
reconnects. What to write next, what an ack or an abort means, and what a lost or
resumed connection does to requests is the sending core's (``kvwire.protocol.sending``,
under one lock in ``kvwire.outbox``). Each writer takes the next chunk from one shared
queue (so faster connections carry more); every stream carries each request's Open
before any of its data, so the receiver never waits on one connection for another.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref

from . import device
from .address import check_address
from .arguments import check_layout
from .buffers import ReusedBuffers
from .codecs import CODECS, choose_codec
from .dialing import Dialer
from .errors import (
    MISCONFIGURATIONS,
    KVWireError,
    LocalProtocolError,
    RemoteProtocolError,
    RequestRejected,
)
from .layer_bytes import LayerBytes
from .layout import KVLayout
from .metrics import PeerCounters, PeerMetrics
from .options import SenderOptions, settle
from .outbound import Transfer
from .outbox import Outbox
from .protocol import MONOTONIC, RequestPlan
from .protocol.sending import Outgoing, SenderBook, StreamState
from .transport import Connection
from .transport.tuning import Tuning
from .wire import framing
from .wire.messages import MAX_JOINED_LAYERS, Abort, Ack, Acks
from .wire.reader import FrameReader

log = logging.getLogger(__name__)

DEFAULT_CHUNK_BYTES = 4 << 20
# Chunks where every connection takes CUDA memory as is: each chunk pays costs that do
# not shrink with it (kernel launches, digests to host, synchronizations, hand-offs), so
# GPU chunks are large (an H100's figures: perf/README.md, "GPU", and perf/results/gpu_chunks.json).
DEVICE_CHUNK_BYTES = 64 << 20
# A writer takes the chunks queued behind its next one until they hold this many bytes,
# and writes them at once: small layers (a hybrid model's states, a short prompt's KV)
# then cost one wake-up and one system call between them, not one each.
WRITE_BATCH_BYTES = 1 << 20
# Layers of many small tensors are joined into buffers kept for the next requests, up to
# this many bytes (kvwire.buffers: a fresh buffer's page faults cost more than the join).
JOIN_BUFFER_BYTES = 64 << 20


class Sender:
    """Sends KV of ``layout`` to the Receiver at ``address`` (``Receiver.address``), layer
    by layer.

    Settings (``backend``, ``streams``, ``secret``, ``chunk_bytes``, ``resume_window_s``...)
    come as ``options=SenderOptions(...)`` or as keyword arguments of the same names (see
    ``kvwire.SenderOptions``); ``timeout`` is the old name of ``connect_timeout_s``. The
    layout must equal the receiver's: the constructor raises LayoutMismatchError otherwise.
    """

    def __init__(self, layout: KVLayout, address: str, *, options: SenderOptions | None = None, **settings):
        check_layout(layout, "Sender")
        self.options = settle(SenderOptions, options, settings, "Sender")
        self.layout = layout
        self.address = check_address(address, what="Sender address")
        self._clock = MONOTONIC  # request deadlines are read from it (a FakeClock in tests)
        self._counters = PeerCounters()
        self._join_buffers = ReusedBuffers(JOIN_BUFFER_BYTES)
        self._dialer = Dialer(layout, self.address, self.options)
        self._reconnecting: set[int] = set()
        self._reconnect_lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        conns, welcome = self._dialer.connect()
        self.tuning: Tuning | None = self._dialer.tuning  # how streams=None decided, and why
        self.max_request_bytes = welcome.max_request_bytes
        book = SenderBook(self.address, len(conns), max_queued_chunks=self.options.max_queued_chunks,
                          clock=self._clock)
        direct = all(conn.capabilities.nonblocking for conn in conns)
        self._outbox = Outbox(book, self._counters, self._write_now if direct else None)
        self._conns = list(conns)  # each stream's current connection
        self._all_conns = list(conns)  # every connection ever made, for the finalizer
        for stream, conn in zip(book.streams, conns):
            self._start_threads(stream, conn)
        self._finalizer = weakref.finalize(self, Sender._shutdown, self._all_conns)

    def _start_threads(self, stream: StreamState, conn: Connection) -> None:
        for role, target in (("tx", self._write_loop), ("ack", self._read_loop)):
            thread = threading.Thread(target=target, args=(stream, conn), name=f"kvwire-{role}{stream.index}",
                                      daemon=True)
            thread.start()
            self._threads.append(thread)

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
                f"request {request_id!r} needs {need} bytes, more than the receiver's budget of {self.max_request_bytes}",
                request_id=request_id, peer=self.address,
            )
        layers = LayerBytes(plan, request_id, device_memory=self.takes_device_memory, verify=self.options.verify,
                            join_buffers=self._join_buffers,
                            join_small_tensors=not self._writes_many_buffers)
        request = self._outbox.open(request_id, plan, timeout, layers)
        return Transfer(request, self._outbox, layers, clock=self._clock)

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
        links = tuple(filter(None, (conn.link_stats() for conn in self._live_conns())))
        return self._counters.snapshot(self.address, links)

    @property
    def takes_device_memory(self) -> bool:
        """Whether CUDA tensors go out as they are (every connection is UCX that opened
        cuda_copy, or runs under numba's simulator); otherwise they are staged to host
        memory first."""
        return bool(self._conns) and all(conn.capabilities.device_memory for conn in self._conns)

    @property
    def _writes_many_buffers(self) -> bool:
        """Whether every connection writes thousands of small buffers at C speed (plain TCP),
        so layers of many small tensors need not be joined first."""
        return bool(self._conns) and all(conn.capabilities.writes_many_buffers for conn in self._conns)

    @property
    def chunk_bytes(self) -> int:
        """Payload bytes per frame of the next request (see SenderOptions.chunk_bytes)."""
        if self.options.chunk_bytes is not None:
            return self.options.chunk_bytes
        on_gpu = self.takes_device_memory and not device.simulated()
        # Unchecked frames over one connection have nothing to overlap (no checksum of one
        # chunk while the next arrives) nor to stripe: each chunk is only a cost.
        unchecked_alone = not self.options.verify and len(self._conns) == 1
        return DEVICE_CHUNK_BYTES if on_gpu or unchecked_alone else DEFAULT_CHUNK_BYTES

    @property
    def backend_names(self) -> list[str]:
        """The backend carrying each live connection ("tcp" or "ucx"); differs under backend="auto"."""
        return [conn.capabilities.backend for conn in self._live_conns()]

    @property
    def num_streams(self) -> int:
        """Connections still alive."""
        return self._outbox.live_streams

    @property
    def connections(self) -> list[Connection]:
        """Each stream's current connection (a lost one stays until it is resumed)."""
        return list(self._conns)

    def close(self) -> None:
        """Close every connection; requests not finished fail with PeerLostError."""
        if not self._outbox.close():
            return
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

    def _live_conns(self) -> list[Connection]:
        return [conn for stream, conn in zip(self._outbox.book.streams, self._conns) if stream.alive]

    # -- I/O threads ----------------------------------------------------------------------

    def _write_loop(self, stream: StreamState, conn: Connection) -> None:
        outbox = self._outbox
        while True:
            left, batch = outbox.next_for(stream, WRITE_BATCH_BYTES)
            if not left and not batch:
                return
            buffers = left + self._buffers(batch, conn)
            try:
                if buffers:
                    conn.send(buffers)  # control messages and chunks in one syscall
            except KVWireError as exc:
                return self._stream_lost(stream, conn, exc)
            # Waiting for the next chunk, this thread must not keep the last one's arrays
            # (the engine's, borrowed only until finish()) alive.
            left = batch = buffers = None

    def _write_now(self, stream: StreamState, batch: list[Outgoing]) -> list:
        """Write ``batch`` from the engine's thread without waiting (see ``kvwire.outbox``);
        the buffers the socket did not take, for the stream's writer."""
        conn = self._conns[stream.index]
        try:
            return conn.send_now(self._buffers(batch, conn))
        except KVWireError as exc:
            self._stream_lost(stream, conn, exc)
            return []

    def _buffers(self, batch: list[Outgoing], conn: Connection) -> list:
        """Control messages and frames of ``batch``, in order, to write at once. Small whole
        layers of one request that follow each other share a frame (``LayerBytes.joinable``)."""
        buffers: list = []
        joined: list[Outgoing] = []  # consecutive joinable layers of one request, not yet framed
        for out in batch:
            if joined and (out.controls or out.request is not joined[0].request or len(joined) == MAX_JOINED_LAYERS):
                buffers += self._frame(joined, conn)
                joined = []
            buffers += [framing.encode(message) for message in out.controls]
            if out.request is None:
                continue
            if out.request.layers.joinable(out.layer):
                joined.append(out)
            else:
                buffers += self._frame([out], conn)
        if joined:
            buffers += self._frame(joined, conn)
        return buffers

    def _frame(self, outs: list[Outgoing], conn: Connection) -> list:
        """The buffers of one frame: a Data frame for one chunk, a Layers frame for several
        whole layers of one request; none if the request was confirmed meanwhile, or if
        building it failed (a bug: it fails the request, never the stream)."""
        out = outs[0]
        request = out.request
        try:
            if len(outs) == 1:
                frame = request.layers.frame(request.rid, out.layer, out.chunk, conn.capabilities.device_memory)
            else:
                frame = request.layers.frame_layers(request.rid, [each.layer for each in outs])
        except Exception as exc:
            log.exception("building layer %d chunk %d of request %r failed", out.layer, out.chunk, request.request_id)
            self._outbox.give_up(request, LocalProtocolError(
                f"request {request.request_id!r}: internal error building a frame: {exc!r}",
                request_id=request.request_id, layer=out.layer, chunk=out.chunk))
            return []
        if frame is None:
            return []
        self._counters.add_bytes(sum(each.nbytes for each in outs))
        return frame

    def _read_loop(self, stream: StreamState, conn: Connection) -> None:
        reader = FrameReader(conn, framing.MAX_STREAM_HEADER_BYTES)  # many acks in one receive
        try:
            while True:
                message = reader.next_message()
                if isinstance(message, (Ack, Acks)):
                    self._outbox.on_ack(message)
                elif isinstance(message, Abort):
                    self._outbox.on_abort(message)
                else:
                    raise RemoteProtocolError(f"a receiver may not send {type(message).__name__} messages",
                                              peer=self.address)
        except KVWireError as exc:
            self._stream_lost(stream, conn, exc)

    # -- connections lost and resumed -----------------------------------------------------

    def _stream_lost(self, stream: StreamState, conn: Connection, reason: KVWireError) -> None:
        """A connection broke: the core puts what it carried unacked back in the queue; reconnect it."""
        if not self._outbox.stream_lost(stream):
            return
        conn.close()
        if self._outbox.closing:
            return
        log.warning("connection %d to %s lost: %s; resuming", stream.index, self.address, reason)
        with self._reconnect_lock:
            if stream.index in self._reconnecting:
                return
            self._reconnecting.add(stream.index)
        thread = threading.Thread(
            target=self._reconnect, args=(stream.index, reason), name=f"kvwire-reconnect{stream.index}", daemon=True
        )
        thread.start()
        self._threads.append(thread)

    def _reconnect(self, index: int, reason: KVWireError) -> None:
        window_s = self.options.resume_window_s
        deadline = time.monotonic() + window_s
        delay = 0.05
        try:
            while not self._outbox.closing and time.monotonic() < deadline:
                try:
                    conn, welcome = self._dialer.dial(index, resume=True)
                except MISCONFIGURATIONS as exc:
                    return self._outbox.fail_all(
                        f"connection {index} to {self.address} lost ({reason}); reconnecting was refused: {exc}"
                    )
                except KVWireError as exc:
                    if self.num_streams == 0 and exc.refused:
                        self._outbox.fail_all(
                            f"connection {index} to {self.address} lost ({reason}); the receiver refuses connections"
                        )
                    time.sleep(delay)
                    delay = min(delay * 2, 1.0)
                    continue
                self._conns[index] = conn
                self._all_conns.append(conn)
                stream = self._outbox.stream_resumed(index, welcome.session_known)
                if stream is None:  # closed meanwhile
                    conn.close()
                    return None
                log.info("connection %d to %s resumed", index, self.address)
                self._start_threads(stream, conn)
                return None
            if self.num_streams == 0:
                self._outbox.fail_all(
                    f"connection {index} to {self.address} lost ({reason}); no reconnect within {window_s}s"
                )
        finally:
            with self._reconnect_lock:
                self._reconnecting.discard(index)
        return None
