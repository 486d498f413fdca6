"""The receiving side's books (kvwire.protocol.receiving) on their own: no sockets, no
threads, no sleeping; requests are plain records and time is a number."""

from dataclasses import dataclass

import pytest

from kvwire import IntegrityError, ProtocolError, RequestRejected
from kvwire.inbound import InboundRequest
from kvwire.protocol import FakeClock, RequestPlan
from kvwire.protocol.receiving import (
    REMEMBERED_OUTCOMES,
    Checked,
    Drain,
    ReceiverBook,
    SessionBook,
    chunk_checked,
    layers_checked,
)
from kvwire.wire.messages import Abort, Ack, Data, Layers

from .support import hybrid_layout


@dataclass(eq=False)
class Request:
    request_id: str
    nbytes: int = 100
    rid: int = 0
    deadline: float = 10.0
    error: Exception | None = None
    done: bool = False
    has_all_chunks: bool = False
    claimed: bool = False
    finished_at: float | None = None


def data(rid, layer=0, chunk=0):
    return Data(rid, layer, chunk, 16, 0)


# -- the receiver's book -----------------------------------------------------------------


def test_the_budget_admits_what_fits_and_frees_what_is_let_go_of():
    book = ReceiverBook(max_bytes=250)
    first, second = Request("a", 100), Request("b", 100)
    for request in (first, second):
        assert book.admit(request.request_id, need=request.nbytes) is None
        book.opened(request)
    assert book.bytes_in_use == 200
    with pytest.raises(RequestRejected, match="request 'c' needs 100 bytes; receiver budget has 50 of 250 free"):
        book.admit("c", need=100)
    book.forget(first)
    book.forget(first)  # once only
    assert book.bytes_in_use == 100 and book.admit("c", need=100) is None


def test_a_request_id_in_flight_is_refused_and_so_is_everything_once_closing():
    book = ReceiverBook(max_bytes=1000)
    book.opened(Request("a"))
    with pytest.raises(RequestRejected, match="request id 'a' is already in flight on this receiver"):
        book.admit("a", need=1)
    book.closed = True
    with pytest.raises(RequestRejected, match="receiver is closing"):
        book.admit("b", need=1)


def test_an_expectation_goes_to_the_request_that_opens_it():
    book = ReceiverBook(max_bytes=1000)
    book.expect("a", "buffers of a")
    assert book.admit("a", need=1) == "buffers of a"
    book.opened(Request("a"))
    assert book.admit("b", need=1) is None
    with pytest.raises(ValueError, match=r"expect\('a'\): the request is already open"):
        book.expect("a", "again")


def test_a_request_released_before_it_arrives_is_refused_once():
    book = ReceiverBook(max_bytes=1000)
    book.expect("early", "buffers")
    assert book.release("early") is None
    with pytest.raises(RequestRejected, match="released by the receiving application before it arrived"):
        book.admit("early", need=1)
    assert book.admit("early", need=1) is None  # the same id, later, is a new request


def test_a_failure_is_remembered_until_the_id_opens_again():
    book = ReceiverBook(max_bytes=1000)
    error = IntegrityError("checksum mismatch")
    book.failed("a", error)
    assert book.failure("a") is error
    book.opened(Request("a"))
    assert book.failure("a") is None


@dataclass(eq=False)
class Session:
    session_id: bytes
    book: SessionBook


def test_a_session_without_a_connection_expires_after_the_grace_period():
    book = ReceiverBook(max_bytes=1000)
    alive, orphan = Session(b"a", SessionBook()), Session(b"o", SessionBook())
    book.sessions = {b"a": alive, b"o": orphan}
    orphan.book.orphaned(10.0, "10.0.0.1:5000", "reset")
    assert book.expire_sessions(now=11.9, grace_s=2.0) == []
    assert book.expire_sessions(now=12.0, grace_s=2.0) == [orphan]
    assert book.sessions == {b"a": alive}


def test_unclaimed_requests_are_those_complete_longer_than_the_claim_timeout():
    book = ReceiverBook(max_bytes=1000)
    stale, fresh, claimed, running = (Request("stale", finished_at=1.0), Request("fresh", finished_at=9.0),
                                      Request("claimed", finished_at=1.0, claimed=True), Request("running"))
    for request in (stale, fresh, claimed, running):
        book.opened(request)
    assert book.unclaimed(now=10.0, claim_timeout_s=5.0) == [stale]
    assert book.unclaimed(now=10.0, claim_timeout_s=None) == []


# -- a session's book --------------------------------------------------------------------


def test_each_open_counts_once_whichever_stream_carries_it():
    book = SessionBook()
    assert [book.is_new(rid) for rid in (0, 0, 1, 0, 1, 2)] == [True, False, True, False, False, True]


def test_data_before_its_open_is_a_protocol_violation():
    book = SessionBook()
    book.is_new(0)
    with pytest.raises(ProtocolError, match="data for request number 1 before its Open"):
        book.data_for_unknown(data(1), set())


def test_a_lost_ack_is_repeated_once_per_layer_and_stream():
    book = SessionBook()
    book.is_new(0)
    request = Request("a", rid=0, done=True)
    book.opened(0, request)
    assert book.let_go(request) is None  # complete: nothing to abort
    stream_a, stream_b = set(), set()
    assert book.data_for_unknown(data(0, layer=2, chunk=0), stream_a) == Ack(0, 2)
    assert book.data_for_unknown(data(0, layer=2, chunk=1), stream_a) is None  # once per layer
    assert book.data_for_unknown(data(0, layer=3), stream_a) == Ack(0, 3)
    assert book.data_for_unknown(data(0, layer=2), stream_b) == Ack(0, 2)  # a new stream says it again


def test_a_refusal_or_failure_is_repeated_once_per_stream_whatever_the_layer():
    book = SessionBook()
    book.is_new(0)
    refusal = Abort(0, "rejected", "over budget")
    book.refused(0, refusal)
    answered = set()
    assert book.data_for_unknown(data(0, layer=0), answered) == refusal
    assert book.data_for_unknown(data(0, layer=1), answered) is None

    book.is_new(1)
    failed = Request("b", rid=1, error=IntegrityError("checksum mismatch"))
    book.opened(1, failed)
    assert book.let_go(failed) == Abort(1, "integrity", "checksum mismatch")
    assert book.data_for_unknown(data(1), answered) == Abort(1, "integrity", "checksum mismatch")


@pytest.mark.parametrize("request_, told", [
    (Request("done", done=True), None),
    (Request("failed", error=IntegrityError("bad")), Abort(0, "integrity", "bad")),
    (Request("released"), Abort(0, "aborted", "receiver released request 'released' before it completed")),
], ids=["complete", "failed", "released-in-flight"])
def test_what_a_sender_is_told_of_a_request_let_go_of(request_, told):
    book = SessionBook()
    book.is_new(0)
    book.opened(0, request_)
    assert book.let_go(request_) == told
    assert book.requests == {}


def test_data_of_an_unknown_finished_request_is_drained_silently():
    book = SessionBook()
    for rid in range(REMEMBERED_OUTCOMES + 1):
        book.is_new(rid)
        book.refused(rid, Abort(rid, "rejected", "no"))
    assert book.data_for_unknown(data(0), set()) is None  # its outcome was forgotten (the oldest)
    assert book.data_for_unknown(data(REMEMBERED_OUTCOMES), set()) is not None


# -- one session's frames, with real requests (kvwire.inbound) and a fake clock ---------------


@pytest.fixture
def session():
    """(a SessionBook holding request 0 of 64 tokens in 4 KiB chunks, that request, the clock)."""
    clock = FakeClock(100.0)
    plan = RequestPlan(hybrid_layout(), 64, "none", 4096)
    request = InboundRequest("req", plan, 5.0, "sender-side", clock=clock, rid=0)
    book = SessionBook()
    book.is_new(0)
    book.opened(0, request)
    return book, request, clock


def frame(request, layer, chunk, nbytes=None):
    size = request.plan.chunk_size(layer, chunk) if nbytes is None else nbytes
    return Data(0, layer, chunk, size, 0)


def arrive(request, layer, chunk):
    """A chunk received in place and checked: what the driver does between Receive and Checked."""
    request.landed(layer, chunk)
    return chunk_checked(request, frame(request, layer, chunk), ok=True)


def test_a_chunk_of_a_held_request_is_received_into_it(session):
    book, request, _ = session
    assert book.on_chunk(request, frame(request, 0, 0)) is None  # None: receive it


def test_a_chunk_outside_its_plan_is_drained_and_fails_the_request(session):
    book, request, _ = session
    action = book.on_chunk(request, frame(request, 0, 0, nbytes=7))
    assert isinstance(action, Drain) and action.nbytes == 7 and action.request is request
    assert isinstance(action.error, ProtocolError) and str(action.error).startswith("request 'req': layer 0 chunk 0")
    action = book.on_chunk(request, Data(0, 9, 0, 16, 0))
    assert str(action.error) == "request 'req': frame for layer 9, the layout has 4"


def test_a_layers_frame_is_received_only_if_it_names_whole_layers_of_its_length():
    plan = RequestPlan(hybrid_layout(), 128, "none", 10240)  # the linear layers whole, the MLA one in 2 chunks
    request = InboundRequest("req", plan, 5.0, "sender-side", clock=FakeClock(100.0), rid=0)
    book = SessionBook()
    book.is_new(0)
    book.opened(0, request)
    whole = [layer for layer in range(plan.num_layers) if plan.num_chunks[layer] == 1]
    cut = next(layer for layer in range(plan.num_layers) if plan.num_chunks[layer] > 1)
    nbytes = sum(plan.layers[layer].nbytes for layer in whole)
    assert book.on_layers(request, Layers(0, whole, nbytes, 0)) is None  # None: receive it
    for layers, length, said in [
        (whole + whole[:1], nbytes, f"a Layers frame names a layer twice: {whole + whole[:1]}"),
        ([whole[0], 9], nbytes, f"a Layers frame for layers [{whole[0]}, 9], the layout has 4"),
        ([whole[0], cut], nbytes, f"a Layers frame for layers [{whole[0]}, {cut}], some of which travel in several chunks"),
        (whole, nbytes + 1, f"a Layers frame of {nbytes + 1} bytes for layers {whole}, which hold {nbytes}"),
    ]:
        action = book.on_layers(request, Layers(0, layers, length, 0))
        assert isinstance(action, Drain) and action.nbytes == length and action.request is request
        assert isinstance(action.error, ProtocolError) and str(action.error) == f"request 'req': {said}"
    action = book.on_layers(request, Layers(0, whole, nbytes, 0, "none"))
    assert str(action.error) == (f"request 'req': layers {whole} came without a checksum, but this sender's "
                                 "handshake said it checks every frame")


def test_layers_of_a_request_let_go_of_are_answered_once_each():
    book = SessionBook()
    book.is_new(0)
    request = Request("a", rid=0, done=True)
    book.opened(0, request)
    book.let_go(request)
    answered = set()
    assert book.layers_for_unknown(Layers(0, [1, 2], 10, 0), answered) == [Ack(0, 1), Ack(0, 2)]
    assert book.layers_for_unknown(Layers(0, [2, 3], 10, 0), answered) == [Ack(0, 3)]
    with pytest.raises(ProtocolError, match="data for request number 5 before its Open"):
        book.layers_for_unknown(Layers(5, [0, 1], 10, 0), answered)


def test_acks_go_per_layer_once_its_last_chunk_is_checked(session):
    _, request, _ = session
    chunks = request.num_chunks[3]
    assert chunks > 1, "the test needs a layer of several chunks"
    for chunk in range(chunks - 1):
        assert arrive(request, 3, chunk) == Checked()  # more of the layer to come: no ack yet
    assert arrive(request, 3, chunks - 1) == Checked(ack=True, finish=True)


def test_a_duplicate_after_a_reconnect_is_drained_and_a_complete_layer_acked_again(session):
    book, request, _ = session
    request.landed(3, 0)  # received, awaiting its check: a copy must not be written over it
    assert book.on_chunk(request, frame(request, 3, 0)) == Drain(frame(request, 3, 0).nbytes)
    for chunk in range(request.num_chunks[3]):
        arrive(request, 3, chunk)
    assert book.on_chunk(request, frame(request, 3, 1)) == Drain(frame(request, 3, 1).nbytes, reply=Ack(0, 3))


def test_a_layers_frame_acks_every_layer_it_completed_or_that_was_here_and_finishes_the_new_ones():
    request = InboundRequest("req", RequestPlan(hybrid_layout(), 64, "none", 1 << 20), 5.0, "sender-side", rid=0)
    assert request.num_chunks[:3] == [1, 1, 1]  # whole layers, as a Layers frame carries
    request.landed(0, 0)
    request.record_whole([0])  # layer 0 arrived before (a resumed sender re-sends it joined)
    request.landed_whole([1, 2])
    assert layers_checked(request, [2, 0, 1], [2, 1]) == ([2, 0, 1], [2, 1])
    assert layers_checked(request, [1, 2], [1, 2]) == ([1, 2], [])  # a copy checked after: acked, not finished


def test_a_copy_checked_after_the_first_acks_again_and_finishes_nothing(session):
    _, request, _ = session
    assert [arrive(request, 0, c) for c in range(request.num_chunks[0])][-1] == Checked(ack=True, finish=True)
    assert chunk_checked(request, frame(request, 0, 0), ok=True) == Checked(ack=True)


def test_a_corrupted_chunk_fails_its_request_with_an_integrity_error(session):
    _, request, _ = session
    checked = chunk_checked(request, frame(request, 2, 0), ok=False)
    assert isinstance(checked.error, IntegrityError) and not checked.ack
    assert str(checked.error) == "request 'req' layer 2 chunk 0: checksum mismatch, the data was corrupted in transit"


def test_an_abort_names_the_request_and_the_sender_s_reason(session):
    book, request, _ = session
    aborted, error = book.on_abort(0, "prefill cancelled")
    assert aborted is request
    assert str(error) == "request 'req' aborted by the sender: prefill cancelled"
    assert book.on_abort(5, "unknown") is None


def test_a_deadline_passes_only_for_requests_still_missing_bytes(session):
    book, request, clock = session
    assert book.late(clock.now()) == []
    clock.advance(5.5)
    [(late, error)] = book.late(clock.now())
    assert late is request
    assert str(error) == "request 'req' from sender-side missed its deadline (0/4 layers arrived)"
    for layer in range(request.num_layers):
        for chunk in range(request.num_chunks[layer]):
            arrive(request, layer, chunk)
    assert book.late(clock.now()) == []  # every byte is here: finishing layers has no deadline


def test_a_lost_session_fails_what_still_misses_bytes(session):
    book, request, _ = session
    book.orphaned(101.0, "10.0.0.1:5000", "connection reset")
    [(lost, error)] = book.lost(2.0)
    assert lost is request
    assert str(error) == ("request 'req': connection from 10.0.0.1:5000 lost with 0/4 layers arrived "
                          "(connection reset); no reconnect within 2.0s")
