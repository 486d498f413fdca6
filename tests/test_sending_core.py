"""The sending core (kvwire.protocol.sending) on its own: no sockets, no threads, a fake
clock. What each stream writes, what a lost connection sends again, what acks, aborts and
deadlines do to a request."""

import pytest

from kvwire import KVLayout, PeerLostError, TensorSpec, TransferAborted, TransferTimeout
from kvwire.protocol import FakeClock, RequestPlan
from kvwire.protocol.sending import VERDICT_GRACE_S, SenderBook
from kvwire.wire.messages import Abort, Ack, Acks, Open

LAYOUT = KVLayout([{"kv": TensorSpec((16,), "float32", per_token=True)} for _ in range(3)])
TOKENS, CHUNK = 8, 256  # each layer: 8 x 64 bytes = 512 bytes, two chunks
PEER = "10.0.0.2:7800"


def plan() -> RequestPlan:
    return RequestPlan(LAYOUT, TOKENS, "none", CHUNK)


def book(streams: int = 1, **kwargs) -> SenderBook:
    return SenderBook(PEER, streams, max_queued_chunks=kwargs.pop("max_queued_chunks", 64),
                      clock=kwargs.pop("clock", FakeClock(100.0)), **kwargs)


def drain(core: SenderBook, stream) -> list:
    """Everything ``stream`` writes now: control messages, and (rid, layer, chunk, resend) per chunk."""
    written = []
    while (out := core.next_for(stream)) is not None:
        written += out.controls
        if out.request is not None:
            written.append((out.request.rid, out.layer, out.chunk, out.resend))
    return written


def handed_over(core: SenderBook, request_id: str = "r", timeout_s: float = 30.0):
    """A request whose engine has handed every layer over."""
    request = core.open(request_id, plan(), timeout_s)
    for layer in range(3):
        core.layer_ready(request, layer)
    return request


def ack(core: SenderBook, request, *layers: int):
    return [core.on_ack(Ack(request.rid, layer)) for layer in layers]


def test_every_stream_says_each_open_before_any_data():
    core = book(streams=2)
    first, second = core.open("a", plan(), 30.0), core.open("b", plan(), 30.0)
    core.layer_ready(second, 0)
    one, two = core.streams
    out = core.next_for(two)
    assert out.controls == [first.opening, second.opening] and (out.request, out.layer, out.chunk) == (second, 0, 0)
    out = core.next_for(one)  # the other stream still owes both Opens before the next chunk
    assert out.controls == [first.opening, second.opening] and (out.request, out.chunk) == (second, 1)
    assert isinstance(first.opening, Open) and first.opening.request_id == "a"
    assert core.next_for(one) is None and core.next_for(two) is None


def test_chunks_are_counted_as_written_and_a_layer_is_confirmed_by_its_ack():
    core = book()
    request = handed_over(core)
    assert core.queued_chunks == 6
    written = drain(core, core.streams[0])
    assert written[1:] == [(0, layer, chunk, False) for layer in range(3) for chunk in range(2)]
    assert request.wire_bytes == LAYOUT.wire_bytes(TOKENS) and request.resent_bytes == 0
    assert ack(core, request, 0, 1) == [None, None] and not request.done
    assert ack(core, request, 2) == [request] and request.done and request.finished_at == 100.0
    assert core.requests == {}


def test_one_acks_message_confirms_the_layers_it_names_each_once():
    core = book()
    request = handed_over(core)
    assert core.on_ack(Acks(request.rid, [2, 0, 7, 2])) is None  # (7: out of range; 2 counted once)
    assert request.acked == [True, False, True] and request.num_acked == 2
    assert core.on_ack(Acks(request.rid, [1])) is request and request.done
    assert core.on_ack(Acks(request.rid, [0, 1, 2])) is None  # a repeat, after the request completed


def test_acks_for_unknown_requests_layers_out_of_range_and_repeats_change_nothing():
    core = book()
    request = core.open("r", plan(), 30.0)
    core.layer_ready(request, 0)
    assert core.on_ack(Ack(99, 0)) is None
    assert core.on_ack(Ack(request.rid, 7)) is None
    ack(core, request, 0, 0)
    assert request.num_acked == 1


def test_a_lost_stream_sends_again_only_the_layers_without_an_ack():
    core = book(streams=2)
    request = handed_over(core)
    lost, kept = core.streams
    drain(core, lost)
    ack(core, request, 0, 2)  # layer 1's ack died with the connection
    assert core.stream_lost(lost) and not core.stream_lost(lost)  # (its reader and writer both report it)
    assert drain(core, kept) == [request.opening, (0, 1, 0, True), (0, 1, 1, True)]
    assert request.resent_bytes == plan().layers[1].nbytes  # one layer, not the request
    assert ack(core, request, 1) == [request]


def test_a_layer_not_yet_begun_keeps_its_place_and_is_not_counted_as_resent():
    core = book(streams=2)
    request = handed_over(core)
    lost, kept = core.streams
    assert core.next_for(lost).chunk == 0  # half of layer 0 went out on the lost stream
    core.stream_lost(lost)
    assert drain(core, kept) == [request.opening, (0, 0, 0, True), (0, 0, 1, True),
                                 (0, 1, 0, False), (0, 1, 1, False), (0, 2, 0, False), (0, 2, 1, False)]
    assert request.resent_bytes == plan().layers[0].nbytes


def test_a_resumed_stream_says_the_open_again_then_what_nothing_carried_while_all_were_down():
    core = book()
    request = core.open("r", plan(), 30.0)
    core.layer_ready(request, 0)
    drain(core, core.streams[0])
    core.stream_lost(core.streams[0])  # the only stream: nobody carries the unacked layer now
    assert core.queued_chunks == 0
    with pytest.raises(PeerLostError, match=f"no live connection to {PEER}"):
        core.open("new", plan(), 30.0)
    stream, failed = core.stream_resumed(0, session_known=True)
    assert failed == [] and stream is core.streams[0]
    assert drain(core, stream) == [request.opening, (0, 0, 0, True), (0, 0, 1, True)]
    assert ack(core, request, 0) == [None]


def test_a_restarted_receiver_fails_every_request_in_flight():
    core = book()
    request = core.open("r", plan(), 30.0)
    core.stream_lost(core.streams[0])
    stream, failed = core.stream_resumed(0, session_known=False)
    assert failed == [request] and isinstance(request.error, PeerLostError)
    assert str(request.error) == f"request 'r': receiver at {PEER} no longer holds this sender's requests (restarted?)"
    assert (request.error.request_id, request.error.peer) == ("r", PEER)
    assert drain(core, stream) == []


@pytest.mark.parametrize("state", ["opened", "mid-layer", "awaiting-acks"])
def test_giving_up_tells_the_receiver_once_and_writes_no_more_of_the_request(state):
    core = book()
    request = core.open("r", plan(), 30.0)
    stream = core.streams[0]
    if state != "opened":
        for layer in range(3):
            core.layer_ready(request, layer)
        core.next_for(stream)
        if state == "awaiting-acks":
            drain(core, stream)
    error = TransferAborted("request 'r': aborted by the sender", request_id="r")
    assert core.give_up(request, error) and not core.give_up(request, error)
    assert request.error is error and core.requests == {}
    owed = [request.opening] if state == "opened" else []  # the receiver hears of the request, then its end
    assert drain(core, stream) == [*owed, Abort(request.rid, "aborted", "request 'r': aborted by the sender")]
    assert core.queued_chunks == 0
    assert core.on_ack(Ack(request.rid, 0)) is None  # a late ack changes nothing


def test_a_confirmed_request_is_not_given_up():
    core = book()
    request = handed_over(core)
    drain(core, core.streams[0])
    ack(core, request, 0, 1, 2)
    assert not core.give_up(request, TransferAborted("too late"))
    assert request.error is None and drain(core, core.streams[0]) == []


def test_the_receiver_s_abort_fails_the_request_with_its_error_marked_remote():
    core = book()
    request = core.open("r", plan(), 30.0)
    core.layer_ready(request, 0)
    failed = core.on_abort(Abort(request.rid, "rejected", "'r' is already in flight"))
    assert failed is request and core.requests == {}
    error = request.error
    assert type(error).__name__ == "RequestRejected" and error.remote
    assert str(error) == f"receiver at {PEER} failed request 'r': 'r' is already in flight"
    assert (error.request_id, error.peer) == ("r", PEER)
    assert core.on_abort(Abort(request.rid, "rejected", "again")) is None
    assert drain(core, core.streams[0]) == [request.opening]  # its queued chunks are skipped
    assert core.on_abort(Abort(12, "protocol", "x")) is None  # unknown: nothing to fail


def test_a_request_past_its_deadline_is_given_up_after_the_receiver_s_grace():
    clock = FakeClock(100.0)
    core = book(clock=clock)
    late, done = core.open("late", plan(), 5.0), handed_over(core, "done", 5.0)
    core.layer_ready(late, 0)
    drain(core, core.streams[0])
    ack(core, late, 0)
    ack(core, done, 0, 1, 2)
    assert core.next_expiry() == 105.0 + VERDICT_GRACE_S
    assert core.expired(105.0) == []  # the receiver's verdict (what arrived) comes first
    assert core.expired(105.0 + VERDICT_GRACE_S) == [late]
    assert isinstance(late.error, TransferTimeout) and not late.error.remote
    assert str(late.error) == "request 'late': receiver confirmed 1/3 layers within 5s"
    assert drain(core, core.streams[0]) == [Abort(late.rid, "timeout", str(late.error))]
    assert done.error is None and core.next_expiry() is None


def test_overdue_while_every_connection_is_down_names_the_lost_connection():
    core = book()
    request = core.open("r", plan(), 5.0)
    core.stream_lost(core.streams[0])
    error = core.overdue(request, 5.0)
    assert isinstance(error, PeerLostError)
    assert str(error) == "request 'r': connection lost and not re-established; receiver confirmed 0/3 layers within 5s"


def test_the_queue_has_room_until_its_bound_and_a_layer_goes_in_whole():
    core = book(max_queued_chunks=3)
    request = core.open("r", plan(), 30.0)
    core.layer_ready(request, 0)
    assert core.has_room()
    core.layer_ready(request, 1)
    assert core.queued_chunks == 4 and not core.has_room()
    core.next_for(core.streams[0])
    core.next_for(core.streams[0])
    assert core.has_room()


def test_closing_fails_every_request_and_refuses_new_ones():
    core = book()
    request = core.open("r", plan(), 30.0)
    assert core.close() == [request]
    assert str(request.error) == "request 'r': sender closed"
    with pytest.raises(PeerLostError, match="no live connection"):
        core.open("s", plan(), 30.0)
