"""The handshake on messages alone (kvwire.protocol.handshake), and its driver fed bytes.

No sockets and no threads: the two state machines pass messages to each other here, the
way they do over a connection, and every refusal is checked on both sides.
"""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvwire import AuthenticationError, KVWireError, LayoutMismatchError, PeerLostError, ProtocolError, TransferTimeout
from kvwire.handshake import run, server_handshake
from kvwire.protocol import FakeClock
from kvwire.protocol.handshake import Accepted, ClientHandshake, ServerHandshake, Step
from kvwire.transport import Capabilities
from kvwire.wire import framing
from kvwire.wire.messages import PROTOCOL_VERSION, Auth, Challenge, Hello, Reject, Welcome

from .support import hybrid_layout

SESSION = b"s" * 16


def client(layout, secret, *, nonce=b"c" * 32, **kw):
    return ClientHandshake(layout=layout, secret=secret, session_id=SESSION, stream_index=0, num_streams=1,
                           nonce=nonce, peer="receiver-side", **kw)


def server(layout, secret, *, nonce=b"r" * 32, **kw):
    return ServerHandshake(layout=layout, secret=secret, nonce=nonce, welcome=lambda hello: Welcome(99),
                           peer="sender-side", **kw)


def exchange(a: ClientHandshake, b: ServerHandshake):
    """Run both machines against each other; (client outcome, server outcome, every message
    in the order sent). An outcome is Accepted or the error its side raises."""
    outcome = {}
    sent = []
    pending = [("client", a.start())]
    while pending:
        side, step = pending.pop()
        sent += step.send
        if step.error is not None or step.accepted is not None:
            outcome[side] = step.error or step.accepted
        other, machine = ("server", b) if side == "client" else ("client", a)
        for message in step.send:
            if other not in outcome:
                pending.append((other, machine.receive(message)))
    return outcome.get("client"), outcome.get("server"), sent


def test_equal_secret_and_layout_are_accepted_on_both_sides():
    layout = hybrid_layout()
    got_client, got_server, sent = exchange(client(layout, b"k"), server(layout, b"k"))
    assert [type(m) for m in sent] == [Hello, Challenge, Auth, Welcome]
    assert sent[2].layout is None  # fingerprints equal: the layout is not sent
    for outcome in (got_client, got_server):
        assert isinstance(outcome, Accepted)
        assert (outcome.protocol, outcome.authenticated, outcome.welcome) == (PROTOCOL_VERSION, True, Welcome(99))
        assert outcome.fingerprint == layout.fingerprint and outcome.hello.session_id == SESSION


def test_no_secret_on_either_side_is_accepted_unauthenticated():
    layout = hybrid_layout()
    got_client, got_server, sent = exchange(client(layout, None), server(layout, None))
    assert got_client.authenticated is got_server.authenticated is False
    assert sent[1].proof == sent[2].proof == b""


@pytest.mark.parametrize(
    "client_secret, server_secret, client_says, server_says",
    [
        (b"a", b"b", "receiver at receiver-side failed to prove the shared secret (it has a different secret)",
         "sender at sender-side refused us: sender: receiver's proof is wrong (it has a different secret)"),
        (None, b"b", "sender sent no proof, but this receiver requires a secret",
         "sender sent no proof, but this receiver requires a secret"),
        (b"a", None, "receiver at receiver-side failed to prove the shared secret (it has no secret configured)",
         "sender at sender-side refused us: sender: receiver's proof is wrong (it has no secret configured)"),
    ],
)
def test_a_wrong_or_missing_secret_is_refused_on_both_sides(client_secret, server_secret, client_says, server_says):
    layout = hybrid_layout()
    got_client, got_server, sent = exchange(client(layout, client_secret), server(layout, server_secret))
    assert isinstance(got_client, AuthenticationError) and str(got_client) == client_says
    assert isinstance(got_server, AuthenticationError) and str(got_server) == server_says
    assert isinstance(sent[-1], Reject) and sent[-1].kind == "auth"  # the side that found it told the other
    assert not any(isinstance(m, Welcome) for m in sent)


def test_a_layout_mismatch_is_explained_by_layer_and_tensor_on_both_sides():
    got_client, got_server, sent = exchange(client(hybrid_layout(state_dim=32), b"k"),
                                            server(hybrid_layout(state_dim=16), b"k"))
    expected = "KV layout mismatch: layer 0 tensor 'conv': receiver has float32[64, 4], sender has float32[128, 4]"
    assert isinstance(got_client, LayoutMismatchError) and str(got_client) == expected
    assert isinstance(got_server, LayoutMismatchError) and str(got_server) == expected
    assert sent[2].layout is not None  # fingerprints differ: the sender described its layout


def test_the_secret_is_checked_before_the_layout():
    got_client, got_server, _ = exchange(client(hybrid_layout(state_dim=32), None), server(hybrid_layout(), b"k"))
    assert isinstance(got_client, AuthenticationError) and isinstance(got_server, AuthenticationError)


def test_a_layout_the_receiver_also_accepts_is_accepted():
    other = hybrid_layout(state_dim=16)
    got_client, got_server, _ = exchange(client(other, b"k"),
                                         server(hybrid_layout(), b"k", also_accepted={other.fingerprint}))
    assert got_server.fingerprint == other.fingerprint and isinstance(got_client, Accepted)


def test_a_probe_gets_the_welcome_without_a_layout():
    got_client, got_server, _ = exchange(client(None, b"k"), server(hybrid_layout(), b"k"))
    assert got_client.hello.probe and got_server.fingerprint == "" and got_client.welcome == Welcome(99)


def test_another_protocol_version_is_refused_either_way():
    layout = hybrid_layout()
    shake = server(layout, b"k")
    old = Hello(PROTOCOL_VERSION - 1, SESSION, 0, 1, layout.fingerprint, b"c" * 32)
    step = shake.receive(old)
    message = f"protocol version {PROTOCOL_VERSION - 1} not supported (receiver speaks {PROTOCOL_VERSION})"
    assert isinstance(step.error, ProtocolError) and str(step.error) == message
    assert step.send == (Reject("protocol", message),)

    shake = client(layout, b"k")
    shake.start()
    step = shake.receive(Challenge(PROTOCOL_VERSION + 1, b"r" * 32, b"", layout.fingerprint))
    assert isinstance(step.error, ProtocolError)
    assert str(step.error) == (f"receiver at receiver-side speaks protocol version {PROTOCOL_VERSION + 1}, "
                               f"this sender {PROTOCOL_VERSION}")


def test_a_replayed_hello_and_auth_do_not_pass_a_fresh_nonce():
    """An eavesdropper who recorded an accepted sender cannot replay it: the receiver's
    nonce is new each time, and the recorded proof covers the old one."""
    layout = hybrid_layout()
    _, accepted, sent = exchange(client(layout, b"k"), server(layout, b"k", nonce=b"1" * 32))
    assert isinstance(accepted, Accepted)
    hello, auth = sent[0], sent[2]
    replayed = server(layout, b"k", nonce=b"2" * 32)
    replayed.receive(hello)
    step = replayed.receive(auth)
    assert isinstance(step.error, AuthenticationError) and "proof of the shared secret is wrong" in str(step.error)
    assert step.accepted is None


def test_a_replayed_challenge_does_not_convince_a_fresh_sender():
    layout = hybrid_layout()
    _, _, sent = exchange(client(layout, b"k", nonce=b"1" * 32), server(layout, b"k"))
    fresh = client(layout, b"k", nonce=b"2" * 32)
    fresh.start()
    step = fresh.receive(sent[1])  # the recorded Challenge proves the secret over the old sender nonce
    assert isinstance(step.error, AuthenticationError) and step.send[0].kind == "auth"


def test_a_proof_cannot_be_reflected():
    """The sender's proof, sent back as a receiver's, fails: the two sides sign different labels."""
    layout = hybrid_layout()
    _, _, sent = exchange(client(layout, b"k"), server(layout, b"k"))
    shake = client(layout, b"k")
    shake.start()
    step = shake.receive(Challenge(PROTOCOL_VERSION, b"r" * 32, sent[2].proof, layout.fingerprint))
    assert isinstance(step.error, AuthenticationError)


@pytest.mark.parametrize("message", [Welcome(1), Auth(b""), Challenge(PROTOCOL_VERSION, b"n" * 32, b"", "f")],
                         ids=lambda m: type(m).__name__)
def test_a_message_out_of_turn_is_a_protocol_error_the_peer_is_told(message):
    step = server(hybrid_layout(), b"k").receive(message)
    assert isinstance(step.error, ProtocolError)
    assert str(step.error) == f"sender-side sent a {type(message).__name__} message where a Hello belongs"
    assert step.send == (Reject("protocol", str(step.error)),)


def test_a_sender_refuses_a_welcome_before_the_challenge():
    shake = client(hybrid_layout(), b"k")
    shake.start()
    step = shake.receive(Welcome(1))
    assert str(step.error) == "receiver-side sent a Welcome message where a Challenge belongs"


def test_the_whole_handshake_has_one_deadline():
    clock = FakeClock()
    shake = server(hybrid_layout(), b"k", clock=clock, timeout_s=10)
    assert shake.seconds_left() == 10
    clock.advance(7)
    assert shake.seconds_left() == 3  # the next read gets what is left, not a fresh 10 s
    clock.advance(3)
    with pytest.raises(TransferTimeout, match="handshake with sender-side took longer than 10s"):
        shake.seconds_left()
    assert client(hybrid_layout(), b"k").seconds_left() is None  # no limit given: the connection's own


# -- the driver, fed bytes --------------------------------------------------------------


class BytesConnection:
    """A Connection whose peer already sent ``incoming`` and then closed; records what is sent."""

    peer = "sender-side"
    capabilities = Capabilities("memory")

    def __init__(self, incoming: bytes):
        self._incoming = memoryview(incoming)
        self.sent: list[bytes] = []
        self.timeouts: list[float | None] = []

    def send(self, buffers):
        self.sent.append(b"".join(bytes(b) for b in buffers))

    def recv_into(self, view):
        if len(self._incoming) < len(view):
            raise PeerLostError(f"connection to {self.peer} closed by the peer")
        view[:] = self._incoming[: len(view)]
        self._incoming = self._incoming[len(view):]

    def set_timeout(self, seconds):
        self.timeouts.append(seconds)

    def link_stats(self):
        return None

    def close(self):
        pass


def serve_bytes(data: bytes, secret=b"k"):
    """What a receiver's handshake makes of ``data`` from a peer: the Hello it accepted or its error."""
    try:
        return server_handshake(BytesConnection(data), layout=hybrid_layout(), secret=secret,
                                welcome=lambda hello: Welcome(1), timeout_s=5)
    except Exception as exc:  # noqa: BLE001 - inspected by the caller
        return exc


def valid_hello() -> bytes:
    return framing.encode(Hello(PROTOCOL_VERSION, SESSION, 0, 1, hybrid_layout().fingerprint, b"n" * 32))


def test_a_peer_that_is_not_kvwire_is_named_so():
    outcome = serve_bytes(b"HTTP/1.1 400 Bad Request\r\n\r\n")
    assert isinstance(outcome, ProtocolError)
    assert str(outcome).startswith("the peer at sender-side does not speak kvwire: it sent b'HTTP'...")


def test_a_handshake_cut_short_is_a_lost_peer():
    hello = valid_hello()
    for cut in (2, len(hello) - 1, len(hello)):  # inside the prefix, inside the Hello, before the Auth
        outcome = serve_bytes(hello[:cut])
        assert isinstance(outcome, PeerLostError), (cut, outcome)


def test_the_driver_gives_each_read_what_is_left_of_the_deadline():
    conn = BytesConnection(valid_hello())
    with pytest.raises(PeerLostError):
        server_handshake(conn, layout=hybrid_layout(), secret=b"k", welcome=lambda hello: Welcome(1), timeout_s=5)
    assert len(conn.timeouts) == 2 and all(0 < t <= 5 for t in conn.timeouts)
    assert type(framing.decode_handshake(conn.sent[0][4:])) is Challenge


def test_a_refusal_is_sent_before_the_error_is_raised_and_a_dead_peer_does_not_hide_it():
    class Gone(BytesConnection):
        def send(self, buffers):
            raise PeerLostError("gone")

    error = AuthenticationError("no")
    with pytest.raises(AuthenticationError):
        run(Gone(b""), server(hybrid_layout(), b"k"), Step(send=(Reject("auth", "no"),), error=error))


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=512))
def test_random_bytes_only_raise_kvwire_errors(data):
    outcome = serve_bytes(data)
    assert isinstance(outcome, KVWireError), repr(outcome)


@settings(max_examples=150, deadline=None)
@given(st.integers(min_value=0), st.integers(min_value=0, max_value=255), st.binary(max_size=64))
def test_a_mutated_hello_never_gets_past_the_proof(position, value, tail):
    opening = bytearray(valid_hello())
    opening[position % len(opening)] = value
    outcome = serve_bytes(bytes(opening) + tail)
    assert isinstance(outcome, KVWireError), repr(outcome)
