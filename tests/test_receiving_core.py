"""The receiving side's books (kvwire.protocol.receiving) on their own: no sockets, no
threads, no sleeping; requests are plain records and time is a number."""

from dataclasses import dataclass

import pytest

from kvwire import IntegrityError, ProtocolError, RequestRejected
from kvwire.protocol.receiving import REMEMBERED_OUTCOMES, ReceiverBook, SessionBook
from kvwire.wire.messages import Abort, Ack, Data


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


def test_deadlines_and_lost_connections_pick_the_requests_still_missing_bytes():
    book = SessionBook()
    late = Request("late", rid=0, deadline=5.0)
    arrived = Request("arrived", rid=1, deadline=5.0, has_all_chunks=True)
    on_time = Request("on-time", rid=2, deadline=50.0)
    failed = Request("failed", rid=3, deadline=50.0, error=IntegrityError("bad"))
    for request in (late, arrived, on_time, failed):
        book.opened(request.rid, request)
    assert book.late(now=10.0) == [late]
    assert book.in_flight() == [late, on_time]
