"""The sending core (``kvwire.protocol.sending``) under one lock, shared by the engine's
threads (``Sender.open``, ``Transfer``) and the sender's I/O threads.

It adds only what the core cannot do without threads: waiting (for room in the queue,
for a stream's next chunk, for the next deadline) and waking a request's ``finish()``
when it settles. The metrics count what settles here, before the engine is woken.
"""

from __future__ import annotations

import threading

from .errors import KVWireError, TransferTimeout, again
from .metrics import PeerCounters
from .protocol.sending import OutboundRequest, Outgoing, SenderBook, StreamState
from .wire.messages import Abort, Ack


class Outbox:
    def __init__(self, book: SenderBook, counters: PeerCounters):
        self.book = book
        self._counters = counters
        self._cv = threading.Condition()

    @property
    def closing(self) -> bool:
        return self.book.closing

    @property
    def live_streams(self) -> int:
        return self.book.live_streams

    # -- the engine's side ----------------------------------------------------------------

    def open(self, request_id: str, plan, timeout_s: float, layers) -> OutboundRequest:
        with self._cv:
            request = self.book.open(request_id, plan, timeout_s, layers=layers, waiter=threading.Event())
            self._cv.notify_all()
        return request

    def submit(self, request: OutboundRequest, layer: int) -> None:
        """Queue a layer the engine handed over; blocks while the queue is full (until the
        request's deadline: TransferTimeout), and raises the request's error if it failed."""
        book = self.book
        with self._cv:
            room = self._cv.wait_for(lambda: book.has_room() or request.error is not None,
                                     max(0.0, request.deadline - book.clock.now()))
            if request.error is not None:
                raise again(request.error)
            if not room:
                raise TransferTimeout(f"request {request.request_id!r}: send queue stayed full until the deadline",
                                      request_id=request.request_id, peer=book.peer)
            book.layer_ready(request, layer)
            self._cv.notify_all()

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

    def next_for(self, stream: StreamState, batch_bytes: int = 0) -> list[Outgoing]:
        """Wait until ``stream`` has something to write, and take it; with ``batch_bytes``,
        also the chunks queued behind it until they hold that many bytes (small layers then
        go out in one write, not one each). Empty once the stream is lost or the sender
        closes. Requests long past their deadline are given up while waiting."""
        book, clock = self.book, self.book.clock
        with self._cv:
            while not book.closing and stream.alive:
                outgoing = book.next_for(stream)
                if outgoing is not None:
                    batch, nbytes = [outgoing], outgoing.nbytes
                    while nbytes < batch_bytes and (more := book.next_for(stream)) is not None:
                        batch.append(more)
                        nbytes += more.nbytes
                    self._cv.notify_all()  # room in the queue
                    return batch
                expiry = book.next_expiry()
                if self._cv.wait(None if expiry is None else max(0.0, expiry - clock.now())):
                    continue
                for request in book.expired(clock.now()):
                    self._settled(request, failed=True)
                self._cv.notify_all()  # their Aborts, maybe for another stream
        return []

    def on_ack(self, msg: Ack) -> None:
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
