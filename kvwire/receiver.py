"""Receiver: serves a port, verifies and places incoming KV, hands requests to the engine.

Threads: one accepts connections, one per connection reads frames into their final
memory, one enforces request deadlines. The engine's calls (``wait``, ``expect``,
``release``) only touch shared state under a lock and never do I/O.

Why it is long: the engine's API (``Receiver``) and the driver that carries out the
receiving core's decisions on the I/O threads share one lock and one set of books; the
decisions themselves already live in kvwire.protocol.receiving, placement in
kvwire.placement and the bytes' landing in kvwire.landing.
"""

from __future__ import annotations

import collections
import functools
import logging
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from .address import check_address
from .arguments import check_layout
from .buffers import ReusedBuffers
from .errors import (
    KVWireError,
    PeerLostError,
    RemoteProtocolError,
    RequestRejected,
    TransferTimeout,
    again,
)
from .handshake import server_handshake
from .inbound import InboundRequest, ReceivedRequest
from .landing import Landing
from .layout import KVLayout
from .metrics import PeerCounters, PeerMetrics
from .options import ReceiverOptions, settle
from .placement import Expectation
from .protocol import MONOTONIC, Clock, RequestPlan
from .protocol.receiving import Drain, ReceiverBook, SessionBook, chunk_checked, layers_checked
from .transport import Connection, get_backend
from .wire import framing
from .wire.messages import Abort, Ack, Acks, Data, Layers, Open, Welcome
from .wire.reader import FrameReader

log = logging.getLogger(__name__)


# A request's acks wait for its last layer's (one write, and one wake of the sender's ack
# reader, per request instead of one per layer: perf/README.md), within bounds: sent once
# the reader would wait with acks held this long or for this many bytes, and by the
# deadline loop at its next turn (0.1 s) if no frame comes. A sender reusing buffers by
# ``layer_sent`` or resuming a lost connection never waits long for them.
ACK_DELAY_S = 0.002
ACK_BATCH_BYTES = 4 << 20
# Layers landing in receiver memory reuse buffers earlier requests let go of, up to this
# many bytes kept (kvwire.buffers: a fresh buffer's page faults cost more than its bytes).
OWN_BUFFER_BYTES = 128 << 20


@dataclass(eq=False)
class _Stream:
    conn: Connection
    session: "_Session"
    clock: Clock = MONOTONIC
    send_lock: threading.Lock = field(default_factory=threading.Lock)
    alive: bool = True

    # (rid, layer) of requests already let go of whose re-sent data this connection
    # answered again (layer -1: the Abort): once each, not once per chunk
    answered_again: set = field(default_factory=set)
    reader: FrameReader = field(init=False)  # frames off the connection, through one buffer
    landing: Landing = field(init=False)  # its receive buffers and verifier thread
    held: list = field(default_factory=list)  # acks held back (encoded), under send_lock
    held_since: float = 0.0  # when the oldest of them was held
    held_bytes: int = 0  # the data they confirm

    def __post_init__(self):
        self.reader = FrameReader(self.conn, framing.MAX_STREAM_HEADER_BYTES, before_wait=self.flush_due)
        self.landing = Landing(self.reader)

    def send(self, message) -> None:
        """Send ``message`` now, after the acks held back."""
        with self.send_lock:
            held = self._take_held()
            self.conn.send([*held, framing.encode(message)])

    def hold(self, message, nbytes: int) -> None:
        """Send ``message`` (an ack of ``nbytes`` of data) with a later write: the next
        message sent, or the held acks' flush once due (``flush_due``)."""
        with self.send_lock:
            if not self.held:
                self.held_since = self.clock.now()
            self.held.append(framing.encode(message))
            self.held_bytes += nbytes

    def flush_due(self) -> None:
        """Send the held acks if they have waited ``ACK_DELAY_S`` or confirm
        ``ACK_BATCH_BYTES``: before the reader waits for more frames, and at the deadline
        loop's turns."""
        with self.send_lock:
            if not self.held or (self.held_bytes < ACK_BATCH_BYTES
                                 and self.clock.now() - self.held_since < ACK_DELAY_S):
                return
        self.flush()

    def flush(self) -> None:
        """Send the held acks; a broken connection is the reader's to find."""
        with self.send_lock:
            held = self._take_held()
            if not held:
                return
            try:
                self.conn.send(held)
            except KVWireError as exc:
                log.debug("could not send %d acks to %s: %s", len(held), self.conn.peer, exc)

    def _take_held(self) -> list:
        held, self.held, self.held_bytes = self.held, [], 0
        return held


@dataclass(eq=False)
class _Session:
    """All streams of one Sender; request numbers (rid) are scoped to it."""

    session_id: bytes
    peer: str
    layout: KVLayout  # the sender's: the receiver's own or one it also accepts
    streams: list[_Stream] = field(default_factory=list)
    book: SessionBook = field(default_factory=SessionBook)  # its requests by number, their outcomes (under lock)
    counters: PeerCounters = field(default_factory=PeerCounters)
    lock: threading.Lock = field(default_factory=threading.Lock)


class Receiver:
    """Serves ``listen`` (``"HOST:PORT"``; port 0 picks a free one, see ``address``) and
    receives KV of ``layout`` from Senders, in the background.

    Settings (``backend``, ``secret``, ``max_bytes``, ``resume_grace_s``, ``also_accepted``,
    ``info``...) come as ``options=ReceiverOptions(...)`` or as keyword arguments of the
    same names (see ``kvwire.ReceiverOptions``). A sender whose layout is neither
    ``layout`` nor one of ``also_accepted`` is refused in the handshake. ``clock``: what
    deadlines and leases are read from (``kvwire.protocol.FakeClock`` to move time by hand).
    """

    def __init__(self, layout: KVLayout, listen: str = "127.0.0.1:0", *, options: ReceiverOptions | None = None,
                 clock: Clock = MONOTONIC, **settings):
        self.layout = check_layout(layout, "Receiver")
        self.options = opts = settle(ReceiverOptions, options, settings, "Receiver")
        self._layouts = {other.fingerprint: other for other in opts.also_accepted}
        self._layouts[self.layout.fingerprint] = self.layout
        self._clock = clock  # deadlines and leases are read from it (kvwire.protocol.FakeClock in tests)
        check_address(listen, what="Receiver listen", listen=True)
        self._listener = get_backend(opts.backend).listen(listen, ssl_context=opts.ssl_context,
                                                          options=opts.transport_options)
        self.address: str = self._listener.address
        self._lock = threading.Condition()
        self._closing = threading.Event()  # the deadline loop's wake-up: not _lock, which every Open notifies
        # layers landing in receiver memory reuse buffers their last requests let go of
        self._own_buffers = ReusedBuffers(OWN_BUFFER_BYTES)
        self._book = ReceiverBook(opts.max_bytes)  # budget, requests by id, failures, expectations (under _lock)
        self._refusals: collections.deque = collections.deque(maxlen=16)
        self._threads: set[threading.Thread] = set()
        self._start(self._accept_loop, "kvwire-rx-accept")
        self._start(self._deadline_loop, "kvwire-rx-deadlines")
        self._finalizer = weakref.finalize(self, Receiver._shutdown, self._listener, self._book.sessions)

    # -- engine API ---------------------------------------------------------------------

    def expect(
        self,
        request_id: str,
        buffers: Mapping[int, Mapping[str, object]] | Sequence[Mapping[str, object]] | None = None,
        *,
        block_ids=None,
        keep_quantized: bool = False,
    ) -> None:
        """Say, before the sender opens ``request_id``, where its tensors should land.

        ``buffers`` maps layer index (or is a list by layer) to ``{tensor name: array}``;
        layers or tensors left out get receiver-owned memory. Per-token arrays may hold
        more tokens than the request (the first ``num_tokens`` rows are written). With
        ``block_ids``, per-token arrays are the engine's paged pools
        ``[num_blocks, block_size, ...]`` and the tokens are scattered into those blocks.
        ``keep_quantized=True`` hands back a lossy codec's codes and scales
        (``name`` and ``name + ".scales"``) instead of decoding them. A misfit buffer fails
        the request with RequestRejected on both sides. Arrays must stay alive until
        ``release``; their content is undefined if the request fails.
        """
        expectation = Expectation.of(self.layout, request_id, buffers, block_ids, keep_quantized)
        with self._lock:
            self._book.expect(request_id, expectation)

    def wait(self, request_id: str, timeout: float | None = None) -> ReceivedRequest:
        """A handle on ``request_id`` as soon as a sender has opened it (not completed it).

        Raises the request's error if it already failed, TransferTimeout if it has not
        been opened within ``timeout`` seconds.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while True:
                state = self._book.requests.get(request_id)
                if state is not None:
                    state.claimed = True
                    return ReceivedRequest(state, self._release_state)
                failure = self._book.failure(request_id)
                if failure is not None:
                    raise again(failure)
                if self._book.closed:
                    raise PeerLostError("receiver is closed")
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TransferTimeout(f"request {request_id!r} was not opened by any sender within {timeout}s")
                self._lock.wait(remaining)

    def release(self, request_id: str) -> None:
        """Free ``request_id``'s memory (aborting it if it is still in flight).

        Released before it arrived, it is refused when its sender opens it (the sender
        gets RequestRejected), instead of waiting unclaimed for ``claim_timeout_s``.
        """
        with self._lock:
            state = self._book.release(request_id)
        if state is not None:
            self._release_state(state)

    def metrics(self) -> dict[str, PeerMetrics]:
        """Per connected sender: bytes, goodput EWMA and its connections' TCP_INFO."""
        with self._lock:
            sessions = list(self._book.sessions.values())
        return {
            s.peer: s.counters.snapshot(s.peer, tuple(filter(None, (st.conn.link_stats() for st in s.streams))))
            for s in sessions
        }

    def refusals(self, since: float = 0.0) -> list[tuple[str, KVWireError]]:
        """(peer, error) of the connections refused in the handshake (wrong secret, other
        layout, not kvwire) since ``since`` (time.monotonic()), newest last, at most 16:
        what a consumer waiting for a push that never opens can tell its user."""
        return [(peer, error) for at, peer, error in list(self._refusals) if at >= since]

    @property
    def bytes_in_use(self) -> int:
        return self._book.bytes_in_use

    def close(self) -> None:
        """Stop serving; requests still in flight fail with PeerLostError."""
        with self._lock:
            if self._book.closed:
                return
            self._book.closed = True
            requests = list(self._book.requests.values())
            self._lock.notify_all()
        self._closing.set()
        for state in requests:
            state.fail(PeerLostError("receiver closed"))
        self._finalizer()
        for thread in list(self._threads):
            if thread is not threading.current_thread():
                thread.join(timeout=5)

    def __enter__(self) -> "Receiver":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @staticmethod
    def _shutdown(listener, sessions: dict) -> None:
        listener.close()
        for session in list(sessions.values()):
            for stream in list(session.streams):
                stream.conn.close()

    # -- connections --------------------------------------------------------------------

    def _start(self, target, name: str, *args) -> None:
        thread = threading.Thread(target=self._run_thread, args=(target, *args), name=name, daemon=True)
        with self._lock:
            self._threads.add(thread)
        thread.start()

    def _run_thread(self, target, *args) -> None:
        try:
            target(*args)
        finally:
            with self._lock:
                self._threads.discard(threading.current_thread())

    def _accept_loop(self) -> None:
        while True:
            conn = self._listener.accept()
            if conn is None or self._book.closed:
                return
            self._start(self._serve, f"kvwire-rx-{conn.peer}", conn)

    def _serve(self, conn: Connection) -> None:
        try:
            conn = self._listener.start_tls(conn, self.options.handshake_timeout_s)
            hello = server_handshake(conn, layout=self.layout, secret=self.options.secret, welcome=self._welcome,
                                     also_accepted=self._layouts, require_verify=self.options.verify,
                                     timeout_s=self.options.handshake_timeout_s)
            conn.set_timeout(None)
        except KVWireError as exc:
            log.warning("refused connection from %s: %s: %s", conn.peer, type(exc).__name__, exc)
            self._refusals.append((time.monotonic(), conn.peer, exc))
            conn.close()
            return
        if hello.probe:  # it had its answer (the info) in the Welcome
            conn.close()
            return
        stream = self._join(hello, conn)
        reason: KVWireError = PeerLostError(f"connection from {conn.peer} closed")
        try:
            self._read_frames(stream)
        except KVWireError as exc:
            reason = exc
        finally:
            self._stream_closed(stream, reason)

    def _welcome(self, hello) -> Welcome:
        with self._lock:
            if hello.probe:
                return Welcome(self.options.max_bytes, info=self.options.info)
            return Welcome(self.options.max_bytes, session_known=hello.session_id in self._book.sessions)

    def _join(self, hello, conn: Connection) -> _Stream:
        with self._lock:
            session = self._book.sessions.get(hello.session_id)
            if session is None:
                layout = self._layouts[hello.fingerprint]
                session = self._book.sessions[hello.session_id] = _Session(hello.session_id, conn.peer, layout)
                session.book.verified = hello.verify
            stream = _Stream(conn, session, self._clock)
            session.streams.append(stream)
            session.book.orphaned_at = None
            if self._book.closed:
                conn.close()
        verb = "resumed" if hello.resume else "joined"
        log.log(
            logging.INFO if hello.resume else logging.DEBUG,
            "stream %d/%d of %s %s",
            hello.stream_index + 1,
            hello.num_streams,
            conn.peer,
            verb,
        )
        return stream

    def _stream_closed(self, stream: _Stream, reason: KVWireError) -> None:
        """A connection ended. Its session's requests wait for the sender to resume
        (re-sending what was not acked, on its other or on new connections); once the
        session has had no connection for ``resume_grace_s``, they fail."""
        stream.alive = False
        stream.conn.close()
        stream.landing.close()
        session = stream.session
        with self._lock:
            session.streams.remove(stream)
            if not session.streams:
                session.book.orphaned(self._clock.now(), stream.conn.peer, str(reason))
        if not isinstance(reason, PeerLostError):
            log.warning("closing connection from %s: %s: %s", stream.conn.peer, type(reason).__name__, reason)

    def _read_frames(self, stream: _Stream) -> None:
        reader = stream.reader
        while True:
            message = reader.next_message()
            if isinstance(message, Data):
                self._on_data(stream, message)
            elif isinstance(message, Layers):
                self._on_layers(stream, message)
            elif isinstance(message, Open):
                self._on_open(stream, message)
            elif isinstance(message, Abort):
                self._on_abort(stream, message)
            else:
                raise RemoteProtocolError(f"a sender may not send {type(message).__name__} messages")

    # -- frames -------------------------------------------------------------------------

    def _on_open(self, stream: _Stream, msg: Open) -> None:
        session = stream.session
        with session.lock:
            if not session.book.is_new(msg.rid):
                return  # the copy of an Open another stream of this session already handled
            try:
                session.book.opened(msg.rid, self._admit(msg, session))
                return
            except RequestRejected as exc:
                refusal = Abort(msg.rid, "rejected", str(exc))
                session.book.refused(msg.rid, refusal)  # said again if it is lost
        log.warning("refused request %r from %s: %s", msg.request_id, session.peer, refusal.reason)
        session.counters.failed()
        self._tell(stream, refusal)

    def _admit(self, msg: Open, session: _Session) -> InboundRequest:
        try:
            plan = RequestPlan(session.layout, msg.num_tokens, msg.codec, msg.chunk_bytes)
        except ValueError as exc:
            raise RequestRejected(f"request {msg.request_id!r}: {exc}") from None
        timeout_s = min(msg.timeout_s, self.options.max_request_timeout_s)
        with self._lock:
            expected = self._book.admit(msg.request_id, plan.receive_bytes)
            state = InboundRequest(msg.request_id, plan, timeout_s, session.peer, expected, clock=self._clock,
                                   rid=msg.rid, session=session, own_buffers=self._own_buffers)
            self._book.opened(state)
            self._lock.notify_all()
        return state

    def _on_data(self, stream: _Stream, msg: Data) -> None:
        session = stream.session
        state = session.book.requests.get(msg.rid)  # (a dict read: no lock, as on every chunk before)
        if state is None:
            with session.lock:
                drain = Drain(msg.nbytes, session.book.data_for_unknown(msg, stream.answered_again))
        else:
            drain = session.book.on_chunk(state, msg)
        if drain is not None:
            stream.landing.drain(msg.nbytes)
            if drain.reply is not None:
                self._tell(stream, drain.reply)
            if drain.error is not None:
                self._fail(session, drain.request, drain.error)
            return
        if not state.begin_write():  # released or failed meanwhile: its memory is not ours to write
            return stream.landing.drain(msg.nbytes)
        views = state.targets(msg.layer, msg.chunk)
        stream.landing.receive(msg, state, views, state.on_device(msg.layer),
                               functools.partial(self._chunk_checked, stream, state, msg))

    def _on_layers(self, stream: _Stream, msg: Layers) -> None:
        """Several whole layers in one frame: each then counts as the Data frame it would
        have come in (its chunk 0), checked, acked and finished as one."""
        session = stream.session
        state = session.book.requests.get(msg.rid)
        if state is None:
            with session.lock:
                replies = session.book.layers_for_unknown(msg, stream.answered_again)
            stream.landing.drain(msg.nbytes)
            for reply in replies:
                self._tell(stream, reply)
            return
        drain = session.book.on_layers(state, msg)
        if drain is not None:
            stream.landing.drain(msg.nbytes)
            return self._fail(session, drain.request, drain.error)
        if not state.begin_write():  # released or failed meanwhile
            return stream.landing.drain(msg.nbytes)
        parts = [(layer, state.targets(layer, 0), state.on_device(layer), state.is_duplicate(layer, 0))
                 for layer in msg.layers]
        ok, written = stream.landing.receive_layers(msg, state, parts)
        if not ok:  # fails the request, naming its first layer
            first = Data(msg.rid, msg.layers[0], 0, state.plan.layers[msg.layers[0]].nbytes, msg.checksum,
                         msg.algorithm)
            return self._chunk_checked(stream, state, first, False, True)
        self._layers_checked(stream, state, msg, written)

    def _layers_checked(self, stream: _Stream, state: InboundRequest, msg: Layers, written: list[int]) -> None:
        """A Layers frame's bytes are in place and matched its checksum: count, ack and finish
        its layers together (one ack, one wake of the engine), as ``_chunk_checked`` does
        for one chunk."""
        session = stream.session
        plan = state.plan
        session.counters.add_bytes(sum(plan.layers[layer].nbytes for layer in written))
        acked, finish = layers_checked(state, msg.layers, written)
        if acked:
            self._ack(stream, state, Acks(msg.rid, acked), msg.nbytes, in_reader=True)
        if finish and state.begin_write():
            self._finish(session, state, finish)

    def _chunk_checked(self, stream: _Stream, state: InboundRequest, msg: Data, ok: bool, in_reader: bool) -> None:
        """A chunk's bytes are in place and its checksum was compared: count, ack, finish.
        ``in_reader``: this runs in the stream's reader thread (not its verifier), which
        sends held acks before it next waits."""
        session = stream.session
        session.counters.add_bytes(msg.nbytes)
        checked = chunk_checked(state, msg, ok)
        if checked.error is not None:
            return self._fail(session, state, checked.error)
        if checked.ack:
            self._ack(stream, state, Ack(msg.rid, msg.layer), msg.nbytes, in_reader=in_reader)
        # Decoding and scattering write engine memory: not once the request is released or
        # failed (this may run in the verifier thread, after the reader has moved on).
        if checked.finish and state.begin_write():
            self._finish(session, state, (msg.layer,))

    def _finish(self, session: _Session, state: InboundRequest, layers) -> None:
        """Decode/scatter ``layers`` of ``state`` and mark them ready, inside a write that
        ``begin_write`` granted (ended here); a failure fails the request instead."""
        try:
            completed = state.finish_layers(layers)
        except Exception as exc:  # decoding or scattering failed: the layer must not show up as ready
            log.exception("finishing layers %s of request %r failed", list(layers), state.request_id)
            error = KVWireError(f"request {state.request_id!r} layer {layers[0]}: {exc}")
        else:
            error = None
        finally:
            state.end_write()
        if error is not None:
            return self._fail(session, state, error)
        if completed:
            session.counters.completed(state.nbytes, state.finished_at - state.opened_at)

    def _on_abort(self, stream: _Stream, msg: Abort) -> None:
        session = stream.session
        with session.lock:
            aborted = session.book.on_abort(msg.rid, msg.reason)
        if aborted is not None:
            self._fail(session, *aborted, tell_sender=False)

    # -- failure, release, deadlines ----------------------------------------------------

    def _tell(self, stream: _Stream, message) -> None:
        """Send a control message; a broken stream is the reader thread's to handle."""
        try:
            stream.send(message)
        except KVWireError as exc:
            log.debug("could not send %s to %s: %s", type(message).__name__, stream.conn.peer, exc)

    def _ack(self, stream: _Stream, state: InboundRequest, ack: Ack | Acks, nbytes: int, *, in_reader: bool) -> None:
        """Ack verified layers (``nbytes`` of data) on the stream they came by, or on a live
        one if that died meanwhile (a chunk may be verified after its reader has moved on).
        Held back while the request is still arriving (``in_reader``: the reader sends them
        when due, see ``ACK_DELAY_S``), but sent before the engine may see the whole request
        (and let go of it, or exit)."""
        last = state.has_all_chunks
        if stream.alive and in_reader and not last:
            stream.hold(ack, nbytes)
        elif stream.alive:
            self._tell(stream, ack)
        else:
            self._tell_session(stream.session, ack)
        if last:  # the request's other acks may wait on other streams of the session
            for other in list(stream.session.streams):
                other.flush()

    def _tell_session(self, session: _Session, message) -> None:
        with self._lock:
            streams = [s for s in session.streams if s.alive]
        if streams:
            self._tell(streams[0], message)

    def _fail(self, session: _Session, state: InboundRequest, error: KVWireError, *, tell_sender: bool = True) -> None:
        if not state.fail(error):
            return
        log.warning("request %r from %s failed: %s: %s", state.request_id, state.peer, type(error).__name__, error)
        session.counters.failed()
        abort = self._forget(state)
        with self._lock:
            self._book.failed(state.request_id, error)
            self._lock.notify_all()
        if tell_sender:
            self._tell_session(session, abort)

    def _forget(self, state: InboundRequest) -> Abort | None:
        """Drop a request from every table and return its memory to the budget; its
        session remembers, and this returns, what the sender is told of it (None: every
        layer was delivered, else the Abort)."""
        session = state.session
        with session.lock:
            outcome = session.book.let_go(state)
        with self._lock:
            self._book.forget(state)
        # Engine memory must not be written once we let go of it: wait out a write in
        # progress, and cut the connection if it is stuck mid-frame.
        if not state.wait_writes(2.0):
            for stream in list(session.streams):
                stream.conn.close()
        return outcome

    def _release_state(self, state: InboundRequest) -> None:
        state.mark_released()  # from here no layer completes: done and error are what _forget sees
        in_flight = not state.done and state.error is None
        outcome = self._forget(state)
        if in_flight:
            self._tell_session(state.session, outcome)

    def _deadline_loop(self) -> None:
        """What the clock makes due: sessions not resumed in time, requests never claimed,
        requests past their deadline."""
        while not self._closing.wait(0.1):
            with self._lock:
                if self._book.closed:
                    return
                now = self._clock.now()
                sessions = list(self._book.sessions.values())
                expired = self._book.expire_sessions(now, self.options.resume_grace_s)
                stale = self._book.unclaimed(now, self.options.claim_timeout_s)
            for session in expired:
                with session.lock:
                    lost = session.book.lost(self.options.resume_grace_s)
                for state, error in lost:
                    self._fail(session, state, error, tell_sender=False)
            for state in stale:
                log.warning("releasing request %r: complete for %.0fs and never claimed",
                            state.request_id, now - state.finished_at)
                self._release_state(state)
            for session in sessions:
                with session.lock:
                    late = session.book.late(now)
                for state, error in late:
                    self._fail(session, state, error)
                for stream in list(session.streams):  # acks held while no frame came
                    stream.flush_due()

