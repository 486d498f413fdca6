"""The sending side's bookkeeping, without I/O: each request's state, the queue of layers
to write, and what each stream writes next.

``SenderBook`` holds the requests in flight by number, one queue of layers waiting to be
written (shared by every stream, so that faster connections carry more) and each
stream's control messages. It keeps every request's Open ahead of its data on every
stream, puts the layers without an ack back at the head when a stream is lost, and
decides what acks, aborts, a resumed session and deadlines do to requests. It only
decides: the Sender (the driver) holds its lock around each call, writes what
``next_for`` gives, and wakes whoever waits on a request that settled. A request's bytes
(``OutboundRequest.layers``) and its waiter are the driver's, never read here.
"""

from __future__ import annotations

import collections
import heapq
from typing import Any, NamedTuple

from ..errors import KVWireError, PeerLostError, TransferTimeout, error_from_kind, kind_of
from ..wire.messages import Abort, Ack, Acks, Open
from .clock import Clock
from .plan import RequestPlan


class OutboundRequest:
    """One request as the sender tracks it: which layers the engine handed over, which
    the receiver acked, the bytes written, and how it ended."""

    def __init__(self, request_id: str, rid: int, plan: RequestPlan, opening: Open, opened_at: float,
                 deadline: float, *, layers: Any = None, waiter: Any = None):
        self.request_id = request_id
        self.rid = rid
        self.plan = plan
        self.opening = opening  # said again on a resumed connection
        self.opened_at = opened_at
        self.deadline = deadline
        self.layers = layers  # the driver's: the bytes of each layer handed over
        self.waiter = waiter  # the driver's: woken when the request settles
        self.num_layers = plan.num_layers
        self.handed = [False] * plan.num_layers
        self.acked = [False] * plan.num_layers
        self.num_acked = 0
        self.wire_bytes = 0
        self.resent_bytes = 0  # written again after a connection was lost
        self.finished_at: float | None = None
        self.error: KVWireError | None = None

    @property
    def done(self) -> bool:
        return self.num_acked == self.num_layers

    @property
    def settled(self) -> bool:
        return self.error is not None or self.num_acked == self.num_layers

    def unacked_layers(self) -> list[int]:
        return [layer for layer in range(self.num_layers) if self.handed[layer] and not self.acked[layer]]


class StreamState:
    """One connection as the book sees it: alive or not, and the control messages it
    owes the receiver (Opens, Aborts) before its next chunk. A resumed connection gets a
    new one, so news from the lost one's threads cannot touch it."""

    __slots__ = ("alive", "control", "index")

    def __init__(self, index: int, control: list | None = None):
        self.index = index
        self.alive = True
        self.control: list = control or []


class Outgoing(NamedTuple):
    """What a stream writes next: its control messages, then (with ``request``) one chunk."""

    controls: list
    request: OutboundRequest | None = None
    layer: int = 0
    chunk: int = 0
    nbytes: int = 0
    resend: bool = False


class _Queued:
    """A layer waiting to be written, or part-way through: its next chunk."""

    __slots__ = ("layer", "next_chunk", "request", "resend")

    def __init__(self, request: OutboundRequest, layer: int, resend: bool):
        self.request, self.layer, self.next_chunk, self.resend = request, layer, 0, resend

    @property
    def remaining(self) -> int:
        return self.request.plan.num_chunks[self.layer] - self.next_chunk


# A request is given up this long after its deadline: the receiver enforces the same
# deadline, and its verdict says more (what arrived), so it should reach the engine first.
VERDICT_GRACE_S = 1.0


class SenderBook:
    """The state of one Sender's session with one receiver (see the module docstring)."""

    def __init__(self, peer: str, num_streams: int, *, max_queued_chunks: int, clock: Clock,
                 verdict_grace_s: float = VERDICT_GRACE_S):
        self.peer = peer
        self.clock = clock
        self.verdict_grace_s = verdict_grace_s
        self.max_queued_chunks = max_queued_chunks
        self.streams = [StreamState(index) for index in range(num_streams)]
        self.requests: dict[int, OutboundRequest] = {}
        self.queue: collections.deque[_Queued] = collections.deque()
        self.queued_chunks = 0
        self.next_rid = 0
        self.closing = False
        self._deadlines: list[tuple[float, int]] = []  # a heap; entries of settled requests wait to be popped

    @property
    def live_streams(self) -> int:
        return sum(stream.alive for stream in self.streams)

    # -- the engine's side ----------------------------------------------------------------

    def open(self, request_id: str, plan: RequestPlan, timeout_s: float, **driver: Any) -> OutboundRequest:
        """A new request, its Open owed to every live stream; PeerLostError when none is
        left (or the sender closes). ``driver``: ``layers`` and ``waiter``."""
        if self.closing or not self.live_streams:
            raise PeerLostError(f"no live connection to {self.peer}", request_id=request_id, peer=self.peer)
        rid, self.next_rid = self.next_rid, self.next_rid + 1
        now = self.clock.now()
        request = OutboundRequest(request_id, rid, plan, plan.open_message(rid, request_id, timeout_s), now,
                                  now + timeout_s, **driver)
        self.requests[rid] = request
        heapq.heappush(self._deadlines, (request.deadline, rid))
        for stream in self.streams:
            if stream.alive:
                stream.control.append(request.opening)
        return request

    def has_room(self) -> bool:
        """Whether the engine may queue another layer (a layer goes in whole)."""
        return self.queued_chunks < self.max_queued_chunks

    def layer_ready(self, request: OutboundRequest, layer: int) -> None:
        """The engine handed ``layer`` over: queue its chunks behind what already waits."""
        request.handed[layer] = True
        entry = _Queued(request, layer, resend=False)
        self.queue.append(entry)
        self.queued_chunks += entry.remaining

    # -- the streams' side ----------------------------------------------------------------

    def next_for(self, stream: StreamState) -> Outgoing | None:
        """What ``stream`` writes now: its control messages and the next chunk any stream
        may take (skipping requests that failed and layers already acked); None if nothing.
        The chunk's bytes count as written now: the ack may come back before the driver
        returns from writing them."""
        controls = stream.control
        if controls:
            stream.control = []
        queue = self.queue
        while queue:
            entry = queue[0]
            request = entry.request
            if request.error is not None or request.acked[entry.layer]:
                queue.popleft()
                self.queued_chunks -= entry.remaining
                continue
            chunk = entry.next_chunk
            entry.next_chunk += 1
            self.queued_chunks -= 1
            if not entry.remaining:
                queue.popleft()
            nbytes = request.plan.chunk_size(entry.layer, chunk)
            request.wire_bytes += nbytes
            if entry.resend:
                request.resent_bytes += nbytes
            return Outgoing(controls, request, entry.layer, chunk, nbytes, entry.resend)
        return Outgoing(controls) if controls else None

    def on_ack(self, msg: Ack | Acks) -> OutboundRequest | None:
        """The receiver verified a layer (or, in Acks, several): the request, once this
        completes it (then it is no longer in flight); None otherwise (also for acks of
        requests no longer held, which a resumed receiver repeats)."""
        request = self.requests.get(msg.rid)
        if request is None or request.error is not None:
            return None
        acked = request.acked
        for layer in msg.layers if type(msg) is Acks else (msg.layer,):
            if 0 <= layer < request.num_layers and not acked[layer]:
                acked[layer] = True
                request.num_acked += 1
        if request.num_acked < request.num_layers:
            return None
        request.finished_at = self.clock.now()
        del self.requests[msg.rid]
        return request

    def on_abort(self, msg: Abort) -> OutboundRequest | None:
        """The receiver failed a request: the request, now failed with the receiver's error
        (``remote``); None if it was not in flight."""
        request = self.requests.pop(msg.rid, None)
        if request is None or request.settled:
            return None
        request.error = error_from_kind(
            msg.kind, f"receiver at {self.peer} failed request {request.request_id!r}: {msg.reason}",
            request_id=request.request_id, peer=self.peer,
        )
        return request

    def give_up(self, request: OutboundRequest, error: KVWireError) -> bool:
        """This side gives up on ``request`` (the engine aborted it, a frame could not be
        built, its deadline passed): fail it, and owe the receiver an Abort on one live
        stream. False if it had already settled."""
        if request.settled:
            return False
        request.error = error
        self.requests.pop(request.rid, None)
        for stream in self.streams:
            if stream.alive:
                stream.control.append(Abort(request.rid, kind_of(error), str(error)))
                break
        return True

    def overdue(self, request: OutboundRequest, waited_s: float) -> KVWireError:
        """The error of a request not confirmed after ``waited_s``: PeerLostError while no
        connection is up (the real cause), else TransferTimeout."""
        confirmed = f"receiver confirmed {request.num_acked}/{request.num_layers} layers within {waited_s:.3g}s"
        fields = {"request_id": request.request_id, "peer": self.peer}
        if not self.live_streams:
            return PeerLostError(
                f"request {request.request_id!r}: connection lost and not re-established; {confirmed}", **fields
            )
        return TransferTimeout(f"request {request.request_id!r}: {confirmed}", **fields)

    def expired(self, now: float) -> list[OutboundRequest]:
        """Requests whose deadline passed ``verdict_grace_s`` ago with no word from the
        receiver, given up (see ``give_up``): the engine may never call ``finish()``."""
        failed = []
        while self._deadlines and self._deadlines[0][0] + self.verdict_grace_s <= now:
            _, rid = heapq.heappop(self._deadlines)
            request = self.requests.get(rid)
            if request is not None and self.give_up(request, self.overdue(request, request.deadline - request.opened_at)):
                failed.append(request)
        return failed

    def next_expiry(self) -> float | None:
        """When ``expired`` next has a request to give up (if nothing settles it first)."""
        while self._deadlines and self._deadlines[0][1] not in self.requests:
            heapq.heappop(self._deadlines)
        return self._deadlines[0][0] + self.verdict_grace_s if self._deadlines else None

    # -- connections lost and resumed -----------------------------------------------------

    def stream_lost(self, stream: StreamState) -> bool:
        """``stream``'s connection broke: False if that was already known. While others are
        up, the layers without an ack go to the head of the queue for them to carry."""
        if not stream.alive:
            return False
        stream.alive = False
        stream.control = []
        if not self.closing and self.live_streams:
            self.requeue_unacked()
        return True

    def stream_resumed(self, index: int, session_known: bool) -> tuple[StreamState, list[OutboundRequest]]:
        """Connection ``index`` is back: its new state (owing every request's Open, ahead of
        any data) and the requests failed because the receiver no longer knew the session
        (restarted). The first connection back re-sends what no connection carried."""
        failed = [] if session_known else self.fail_all(
            f"receiver at {self.peer} no longer holds this sender's requests (restarted?)"
        )
        stream = self.streams[index] = StreamState(index, [request.opening for request in self.requests.values()])
        if self.live_streams == 1:
            self.requeue_unacked()
        return stream, failed

    def requeue_unacked(self) -> None:
        """Every layer written in part or whole without an ack goes back to the head of the
        queue, whole: the receiver keeps what it verified and ignores repeats, so nothing
        restarts. Layers not yet begun keep their place."""
        untouched = {(entry.request.rid, entry.layer) for entry in self.queue if entry.next_chunk == 0}
        again = [
            _Queued(request, layer, resend=True)
            for rid, request in sorted(self.requests.items())
            if request.error is None
            for layer in request.unacked_layers()
            if (rid, layer) not in untouched
        ]
        resent = {(entry.request.rid, entry.layer) for entry in again}
        kept = [entry for entry in self.queue if (entry.request.rid, entry.layer) not in resent]
        self.queue = collections.deque(again + kept)
        self.queued_chunks = sum(entry.remaining for entry in self.queue)

    def fail_all(self, why: str) -> list[OutboundRequest]:
        """Fail every request in flight with PeerLostError (``why``)."""
        failed = list(self.requests.values())
        self.requests.clear()
        for request in failed:
            request.error = PeerLostError(f"request {request.request_id!r}: {why}", request_id=request.request_id,
                                          peer=self.peer)
        return failed

    def close(self) -> list[OutboundRequest]:
        """The sender closes: no more writing; every request in flight fails."""
        self.closing = True
        return self.fail_all("sender closed")
