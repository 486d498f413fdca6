"""The sending core (``kvwire.protocol.sending``) under one lock, shared by the engine's
threads (``Sender.open``, ``Transfer``) and the sender's I/O threads.

It adds only what the core cannot do without threads: waiting (for room in the queue,
for a stream's next chunk, for the next deadline), waking a request's ``finish()`` when
it settles, and who writes on a stream now. The metrics count what settles here, before
the engine is woken.

Writing directly: a small layer handed over while a stream's writer waits idle is
written by the engine's own thread (``write_now``, given by the driver), without
waiting: what the socket does not take at once is left to the writer. Waking the writer
for it cost two thread switches and a wait for the GIL per layer, more than writing it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from .errors import KVWireError, TransferTimeout, again
from .metrics import PeerCounters
from .protocol.sending import OutboundRequest, Outgoing, SenderBook, StreamState
from .wire.messages import Abort, Ack, Acks

# Layers handed over together up to this size (and the chunks queued behind them) may be
# written by the engine's thread; larger ones go to the writer, whose copy into the kernel
# overlaps the engine's work.
DIRECT_WRITE_BYTES = 1 << 20

WriteNow = Callable[[StreamState, list[Outgoing]], list]


class Outbox:
    def __init__(self, book: SenderBook, counters: PeerCounters, write_now: WriteNow | None = None):
        """``write_now(stream, batch)``: write a batch without waiting, return the buffers
        left (None: no stream ever takes direct writes)."""
        self.book = book
        self._counters = counters
        self._cv = threading.Condition()
        self._write_now = write_now
        self._idle: set[StreamState] = set()  # streams whose writer waits for work
        self._claimed: set[StreamState] = set()  # streams an engine's thread writes on now
        self._left: dict[StreamState, list] = {}  # bytes a direct write left, the writer's next

    @property
    def closing(self) -> bool:
        return self.book.closing

    @property
    def live_streams(self) -> int:
        return self.book.live_streams

    # -- the engine's side ----------------------------------------------------------------

    def open(self, request_id: str, plan, timeout_s: float, layers) -> OutboundRequest:
        """A new request; its Open is written by this thread where a stream's writer waits
        idle (as a small layer is), else by the writers."""
        with self._cv:
            request = self.book.open(request_id, plan, timeout_s, layers=layers, waiter=threading.Event())
            claim = self._claim_idle(0)
            if claim is None or self.book.live_streams > 1:  # (every stream owes the Open)
                self._cv.notify_all()
        if claim is not None:
            self._write_claimed(*claim)
        return request

    def submit(self, request: OutboundRequest, layers: list[int]) -> bool:
        """Queue layers the engine handed over together; blocks while the queue is full
        (until the request's deadline: TransferTimeout), and raises the request's error if
        it failed. True if this thread wrote them (see the module's docstring), False if a
        writer will."""
        book = self.book
        with self._cv:
            room = self._cv.wait_for(lambda: book.has_room() or request.error is not None,
                                     max(0.0, request.deadline - book.clock.now()))
            if request.error is not None:
                raise again(request.error)
            if not room:
                raise TransferTimeout(f"request {request.request_id!r}: send queue stayed full until the deadline",
                                      request_id=request.request_id, peer=book.peer)
            for layer in layers:
                book.layer_ready(request, layer)
            claim = self._claim_idle(sum(request.plan.layers[layer].nbytes for layer in layers))
            if claim is None:
                self._cv.notify_all()
                return False
        self._write_claimed(*claim)
        return True

    def _write_claimed(self, stream: StreamState, batch: list[Outgoing]) -> None:
        """Write ``batch`` on ``stream``, claimed by ``_claim_idle``, from this thread; what
        the socket did not take goes to the stream's writer."""
        left = []
        try:
            left = self._write_now(stream, batch)
        finally:
            batch = None  # not the engine's arrays' keeper past this call
            with self._cv:
                self._claimed.discard(stream)
                if left and stream.alive:  # (a stream lost meanwhile re-sends its chunks whole)
                    self._left[stream] = left
                if left or self.book.queue or stream.control:
                    self._cv.notify_all()

    def _claim_idle(self, nbytes: int) -> tuple[StreamState, list[Outgoing]] | None:
        """A stream whose writer waits, and what it writes next, for the caller to write;
        None if there is none, or the layer is large. (Under the lock.)"""
        if self._write_now is None or nbytes > DIRECT_WRITE_BYTES:
            return None
        for stream in self._idle:
            if stream.alive and stream not in self._claimed and stream not in self._left:
                batch = self._take(stream, DIRECT_WRITE_BYTES)
                if batch:
                    self._claimed.add(stream)
                return (stream, batch) if batch else None
        return None

    def _take(self, stream: StreamState, batch_bytes: int) -> list[Outgoing]:
        """What ``stream`` writes next, with the chunks queued behind it up to ``batch_bytes``."""
        book = self.book
        outgoing = book.next_for(stream)
        if outgoing is None:
            return []
        batch, nbytes = [outgoing], outgoing.nbytes
        while nbytes < batch_bytes and (more := book.next_for(stream)) is not None:
            batch.append(more)
            nbytes += more.nbytes
        return batch

    def wait(self, request: OutboundRequest, timeout_s: float) -> bool:
        """Whether ``request`` settled (done or failed) within ``timeout_s``."""
        return request.waiter.wait(max(0.0, timeout_s))

    def give_up(self, request: OutboundRequest, error: KVWireError) -> None:
        with self._cv:
            failed = self.book.give_up(request, error)
            self._cv.notify_all()
        if failed:
            self._settled(request, failed=True)

    def overdue(self, request: OutboundRequest, waited_s: float) -> KVWireError:
        with self._cv:
            return self.book.overdue(request, waited_s)

    # -- the I/O threads' side ------------------------------------------------------------

    def next_for(self, stream: StreamState, batch_bytes: int = 0) -> tuple[list, list[Outgoing]]:
        """Wait until ``stream`` has something to write, and take it: the bytes a direct write
        left, then what the book gives, with ``batch_bytes`` also the chunks queued behind
        it until they hold that many bytes (small layers then go out in one write, not one
        each). Nothing once the stream is lost or the sender closes. Requests long past
        their deadline are given up while waiting."""
        book, clock = self.book, self.book.clock
        with self._cv:
            while not book.closing and stream.alive:
                if stream not in self._claimed:
                    left = self._left.pop(stream, [])
                    batch = self._take(stream, batch_bytes)
                    if left or batch:
                        self._cv.notify_all()  # room in the queue
                        return left, batch
                expiry = book.next_expiry()
                self._idle.add(stream)
                try:
                    woken = self._cv.wait(None if expiry is None else max(0.0, expiry - clock.now()))
                finally:
                    self._idle.discard(stream)
                if woken:
                    continue
                for request in book.expired(clock.now()):
                    self._settled(request, failed=True)
                self._cv.notify_all()  # their Aborts, maybe for another stream
        return [], []

    def on_ack(self, msg: Ack | Acks) -> None:
        with self._cv:
            request = self.book.on_ack(msg)
        if request is not None:
            request.layers.release()  # stop borrowing the engine's arrays
            self._settled(request, failed=False)

    def on_abort(self, msg: Abort) -> None:
        with self._cv:
            request = self.book.on_abort(msg)
            self._cv.notify_all()
        if request is not None:
            self._settled(request, failed=True)

    def stream_lost(self, stream: StreamState) -> bool:
        """Whether this is news (a stream's reader and writer both report its loss)."""
        with self._cv:
            lost = self.book.stream_lost(stream)
            self._left.pop(stream, None)  # its chunks are queued again whole
            self._cv.notify_all()
        return lost

    def stream_resumed(self, index: int, session_known: bool) -> StreamState | None:
        """The resumed stream's state, or None if the sender closed meanwhile."""
        with self._cv:
            if self.book.closing:
                return None
            stream, failed = self.book.stream_resumed(index, session_known)
            self._cv.notify_all()
        for request in failed:
            self._settled(request, failed=True)
        return stream

    def fail_all(self, why: str) -> None:
        with self._cv:
            failed = self.book.fail_all(why)
            self._cv.notify_all()
        for request in failed:
            self._settled(request, failed=True)

    def close(self) -> bool:
        """Fail what is in flight and stop the writers; False if already closed."""
        with self._cv:
            if self.book.closing:
                return False
            failed = self.book.close()
            self._left.clear()
            self._cv.notify_all()
        for request in failed:
            request.waiter.set()
        return True

    def _settled(self, request: OutboundRequest, *, failed: bool) -> None:
        if failed:
            self._counters.failed()
        else:
            self._counters.completed(request.wire_bytes, request.finished_at - request.opened_at)
        request.waiter.set()
