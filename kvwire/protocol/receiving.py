"""The receiving side's bookkeeping, without I/O: who may open what, what memory is
promised, what became of each request, and what is due.

``ReceiverBook`` is the receiver's state across sessions: the memory budget, the requests
in flight by id, failures and early releases remembered for a while, the engine's
expectations. ``SessionBook`` is one sender session's: its requests by number, the highest
number it opened, and how the requests it let go of ended (said again to a resumed sender
re-sending their data). ``on_chunk`` and ``chunk_checked`` decide what a Data frame and
its checksum comparison lead to. All of it only decides; the Receiver (the driver) holds its
locks around each call (``on_chunk`` needs none), moves the bytes and tells the peer. The
requests are the driver's (``kvwire.inbound.InboundRequest``), read here through their
attributes and methods, never their payload.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Any

from ..errors import (
    IntegrityError,
    KVWireError,
    PeerLostError,
    RemoteProtocolError,
    RequestRejected,
    TransferAborted,
    TransferTimeout,
    kind_of,
)
from ..wire.messages import Abort, Ack, Data, Layers

REMEMBERED_FAILURES = 4096
REMEMBERED_OUTCOMES = 4096  # per session: a sender re-sends only requests it has not finished (small entries)


def remember(table: collections.OrderedDict, key, value, limit: int) -> None:
    """Put ``key`` in a bounded table, dropping its oldest entries beyond ``limit``."""
    table[key] = value
    while len(table) > limit:
        table.popitem(last=False)


@dataclass(frozen=True)
class Drain:
    """Read the frame's payload into nothing; then send ``reply`` back on the same stream
    and fail ``request`` with ``error``, where given."""

    nbytes: int
    reply: Ack | Abort | None = None
    request: Any = None
    error: KVWireError | None = None


@dataclass(frozen=True)
class Checked:
    """What follows a chunk's checksum comparison: ``error`` fails the request; else ``ack``
    the layer (before the engine may act on it) and, for its last chunk, ``finish`` it
    (decode and scatter, then mark it ready)."""

    ack: bool = False
    finish: bool = False
    error: KVWireError | None = None


NOTHING, ACK, ACK_AND_FINISH = Checked(), Checked(ack=True), Checked(ack=True, finish=True)  # (per chunk: no allocation)


def chunk_checked(request, msg: Data, ok: bool) -> Checked:
    """Count a chunk whose bytes are in place and were checked (``ok``: the checksum matched)."""
    if not ok:
        return Checked(error=IntegrityError(
            f"request {request.request_id!r} layer {msg.layer} chunk {msg.chunk}: "
            f"checksum mismatch, the data was corrupted in transit",
            request_id=request.request_id, layer=msg.layer, chunk=msg.chunk, peer=request.peer,
        ))
    if not request.record_chunk(msg.layer, msg.chunk):
        # A copy (re-sent after a reconnect) was verified first and its ack may have gone to
        # the connection that died: ack again, as for a duplicate.
        return ACK if request.layer_complete(msg.layer) else NOTHING
    return ACK_AND_FINISH


def layers_checked(request, layers: list[int], written: list[int]) -> tuple[list[int], list[int]]:
    """Count the layers of a Layers frame that were written and matched its checksum:
    (the layers to ack: each of the frame's now complete, so a copy of one already here is
    acked again; those to finish: the ones this completed)."""
    finish = request.record_whole(written)
    return [layer for layer in layers if request.layer_complete(layer)], finish


class ReceiverBook:
    """The receiver's state across sessions; the caller serializes every call (one lock)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes_in_use = 0
        self.closed = False
        self.requests: dict[str, Any] = {}
        self.sessions: dict[bytes, Any] = {}  # the driver's session objects (each with a SessionBook), by id
        self._failures: collections.OrderedDict[str, KVWireError] = collections.OrderedDict()
        self._released: collections.OrderedDict[str, None] = collections.OrderedDict()  # before they arrived
        self._expected: dict[str, Any] = {}

    def expect(self, request_id: str, expectation) -> None:
        """Keep where ``request_id``'s tensors should land until its sender opens it."""
        if request_id in self.requests:
            raise ValueError(f"expect({request_id!r}): the request is already open")
        self._expected[request_id] = expectation

    def admit(self, request_id: str, need: int):
        """May a sender open ``request_id`` needing ``need`` bytes? Its expectation (or None)
        if so; RequestRejected saying why not (closing, a duplicate id, released by the
        engine before it arrived, over the budget)."""
        if self.closed:
            raise RequestRejected("receiver is closing", request_id=request_id)
        if request_id in self.requests:
            raise RequestRejected(f"request id {request_id!r} is already in flight on this receiver",
                                  request_id=request_id)
        if request_id in self._released:
            del self._released[request_id]
            raise RequestRejected(f"request {request_id!r} was released by the receiving application before it arrived",
                                  request_id=request_id)
        if self.bytes_in_use + need > self.max_bytes:
            raise RequestRejected(
                f"request {request_id!r} needs {need} bytes; receiver budget has "
                f"{self.max_bytes - self.bytes_in_use} of {self.max_bytes} free", request_id=request_id
            )
        return self._expected.pop(request_id, None)

    def opened(self, request) -> None:
        """An admitted request now holds its memory."""
        self.requests[request.request_id] = request
        self.bytes_in_use += request.nbytes
        self._failures.pop(request.request_id, None)

    def forget(self, request) -> None:
        """Drop a request let go of and return its memory to the budget (once)."""
        if self.requests.get(request.request_id) is request:
            del self.requests[request.request_id]
            self.bytes_in_use -= request.nbytes

    def failed(self, request_id: str, error: KVWireError) -> None:
        """Remember how ``request_id`` failed, for an engine that asks for it later."""
        remember(self._failures, request_id, error, REMEMBERED_FAILURES)

    def failure(self, request_id: str) -> KVWireError | None:
        return self._failures.get(request_id)

    def release(self, request_id: str):
        """The engine lets go of ``request_id``: its request if in flight (the caller frees
        it); else it is refused when its sender opens it."""
        self._expected.pop(request_id, None)
        request = self.requests.get(request_id)
        if request is None:
            remember(self._released, request_id, None, REMEMBERED_FAILURES)
        return request

    def expire_sessions(self, now: float, grace_s: float) -> list:
        """Drop and return the sessions that have had no connection for ``grace_s``: their
        sender did not resume in time (their requests still missing bytes fail)."""
        expired = [s for s in self.sessions.values()
                   if s.book.orphaned_at is not None and now - s.book.orphaned_at >= grace_s]
        for session in expired:
            del self.sessions[session.session_id]
        return expired

    def unclaimed(self, now: float, claim_timeout_s: float | None) -> list:
        """Requests complete for longer than ``claim_timeout_s`` that no engine waited for."""
        if claim_timeout_s is None:
            return []
        return [r for r in self.requests.values()
                if not r.claimed and r.finished_at is not None and now - r.finished_at > claim_timeout_s]


class SessionBook:
    """One sender session's requests by number (rid), and the outcomes of those let go of;
    the caller serializes every call (the session's lock)."""

    def __init__(self):
        self.requests: dict[int, Any] = {}
        self.max_rid = -1
        self._outcomes: collections.OrderedDict[int, Abort | None] = collections.OrderedDict()
        # When the session's last connection closed (None while it has one), to whom and why;
        # under the receiver's lock, like the sessions table (see ReceiverBook.expire_sessions).
        self.orphaned_at: float | None = None
        self.lost_peer = self.lost_cause = ""
        self.verified = True  # every frame carries a checksum (the sender did not ask to skip them)

    def orphaned(self, now: float, peer: str, cause: str) -> None:
        """The session's last connection closed: its sender may still resume."""
        self.orphaned_at, self.lost_peer, self.lost_cause = now, peer, cause

    def is_new(self, rid: int) -> bool:
        """Whether an Open is the first of request ``rid`` (every stream carries a copy)."""
        if rid <= self.max_rid:
            return False
        self.max_rid = rid
        return True

    def opened(self, rid: int, request) -> None:
        self.requests[rid] = request

    def refused(self, rid: int, refusal: Abort) -> None:
        """An Open refused: remembered so that it is said again if the refusal is lost."""
        remember(self._outcomes, rid, refusal, REMEMBERED_OUTCOMES)

    def let_go(self, request) -> Abort | None:
        """Drop a request (failed, released or complete); what its sender is told of it,
        remembered for a resumed sender: None (every layer delivered) or the Abort."""
        if request.error is not None:
            outcome = Abort(request.rid, kind_of(request.error), str(request.error))
        elif request.done:
            outcome = None
        else:
            outcome = Abort(request.rid, "aborted",
                            f"receiver released request {request.request_id!r} before it completed")
        self.requests.pop(request.rid, None)
        remember(self._outcomes, request.rid, outcome, REMEMBERED_OUTCOMES)
        return outcome

    def data_for_unknown(self, msg: Data, answered: set) -> Ack | Abort | None:
        """Data for a request this session does not hold: ProtocolError before its Open;
        otherwise the bytes are drained, and a request let go of is answered again once per
        stream and layer (``answered``: that stream's record): a resumed sender re-sends
        layers it had no ack for, since the ack (or abort) died with the connection that
        carried it, and would otherwise wait for it until its deadline."""
        return self._answer_unknown(msg.rid, msg.layer, answered)

    def layers_for_unknown(self, msg: Layers, answered: set) -> list[Ack | Abort]:
        """``data_for_unknown`` for each layer of a Layers frame: what to answer."""
        replies = [self._answer_unknown(msg.rid, layer, answered) for layer in msg.layers]
        return [reply for reply in replies if reply is not None]

    def _answer_unknown(self, rid: int, layer: int, answered: set) -> Ack | Abort | None:
        if rid > self.max_rid:
            raise RemoteProtocolError(f"data for request number {rid} before its Open")
        if rid not in self._outcomes:
            return None
        outcome = self._outcomes[rid]
        key = (rid, layer if outcome is None else -1)
        if key in answered:
            return None
        if len(answered) >= REMEMBERED_OUTCOMES:
            answered.clear()  # (at worst an answer is given twice)
        answered.add(key)
        return Ack(rid, layer) if outcome is None else outcome

    def on_chunk(self, request, msg: Data) -> Drain | None:
        """Where a Data frame's payload goes, for a request this session holds (found in
        ``requests`` by the driver; for one it does not: ``data_for_unknown``): None to
        receive it into the request's memory for its chunk, or a Drain: a chunk already here (a resumed sender re-sends what it had no ack for: keep what
        arrived, and ack a complete layer again, its first ack may have been lost), or a
        chunk outside its request's plan, or without a checksum in a session that checks
        every frame (either fails it). Reads only the request, which keeps its own lock:
        the hot path takes no session lock."""
        layer, chunk = msg.layer, msg.chunk
        if layer < request.num_layers and chunk < request.num_chunks[layer] and request.is_duplicate(layer, chunk):
            return Drain(msg.nbytes, Ack(msg.rid, layer) if request.layer_complete(layer) else None)
        problem = request.plan.check_data(layer, chunk, msg.nbytes)
        if problem is None and msg.algorithm == "none" and self.verified:
            problem = (f"layer {layer} chunk {chunk} came without a checksum, but this sender's handshake "
                       "said it checks every frame")
        if problem is not None:
            return Drain(msg.nbytes, request=request,
                         error=RemoteProtocolError(f"request {request.request_id!r}: {problem}",
                                                   request_id=request.request_id, layer=layer, chunk=chunk,
                                                   peer=request.peer))
        return None

    def on_layers(self, request, msg: Layers) -> Drain | None:
        """None to receive a Layers frame for ``request``, or a Drain that fails it: layers
        named twice or outside the plan, a layer the plan cuts in several chunks, a length
        that is not theirs, or no checksum where every frame is checked. Which of its layers
        are already here is the driver's to see (``is_duplicate``), layer by layer."""
        plan, layers = request.plan, msg.layers
        problem = None
        if len(set(layers)) != len(layers):
            problem = f"a Layers frame names a layer twice: {layers}"
        elif not all(0 <= layer < plan.num_layers for layer in layers):
            problem = f"a Layers frame for layers {layers}, the layout has {plan.num_layers}"
        elif any(plan.num_chunks[layer] != 1 for layer in layers):
            problem = f"a Layers frame for layers {layers}, some of which travel in several chunks"
        elif msg.nbytes != (expected := sum(plan.layers[layer].nbytes for layer in layers)):
            problem = f"a Layers frame of {msg.nbytes} bytes for layers {layers}, which hold {expected}"
        elif msg.algorithm == "none" and self.verified:
            problem = (f"layers {layers} came without a checksum, but this sender's handshake said it "
                       "checks every frame")
        if problem is None:
            return None
        return Drain(msg.nbytes, request=request,
                     error=RemoteProtocolError(f"request {request.request_id!r}: {problem}",
                                               request_id=request.request_id, layer=layers[0], chunk=0,
                                               peer=request.peer))

    def on_abort(self, rid: int, reason: str) -> tuple[Any, KVWireError] | None:
        """The sender gave up on request ``rid``: (the request, its error) if this session holds it."""
        request = self.requests.get(rid)
        if request is None:
            return None
        return request, TransferAborted(f"request {request.request_id!r} aborted by the sender: {reason}",
                                        request_id=request.request_id, peer=request.peer, remote=True)

    def late(self, now: float) -> list[tuple[Any, KVWireError]]:
        """(request, error) of each request whose deadline passed before all its bytes arrived."""
        return [
            (r, TransferTimeout(f"request {r.request_id!r} from {r.peer} missed its deadline "
                                f"({r.num_ready}/{r.num_layers} layers arrived)", request_id=r.request_id,
                                peer=r.peer))
            for r in self.requests.values() if r.deadline < now and not r.has_all_chunks
        ]

    def lost(self, grace_s: float) -> list[tuple[Any, KVWireError]]:
        """(request, error) of each request still waiting for bytes once the session's last
        connection was not replaced within ``grace_s``. A request whose bytes all arrived
        does not need the connection any more."""
        return [
            (r, PeerLostError(f"request {r.request_id!r}: connection from {self.lost_peer} lost with "
                              f"{r.num_ready}/{r.num_layers} layers arrived ({self.lost_cause}); "
                              f"no reconnect within {grace_s}s", request_id=r.request_id, peer=self.lost_peer))
            for r in self.requests.values() if not r.has_all_chunks and r.error is None
        ]
