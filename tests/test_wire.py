"""The wire layer fed bytes directly: framing bounds, decoders, and the handshake."""

import socket
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvwire import AuthenticationError, LayoutMismatchError, ProtocolError
from kvwire.transport.tcp import TcpConnection
from kvwire.wire import framing
from kvwire.wire.handshake import client_handshake, server_handshake
from kvwire.wire.messages import Abort, Ack, Data, Hello, Open, Welcome

from .conftest import hybrid_layout

VALID = [
    Open(3, "req-1", 4096, "none", 1 << 22, 30.0),
    Data(3, 1, 0, 1024, 2**64 - 1),
    Ack(3, 1),
    Abort(3, "integrity", "checksum mismatch"),
]


@pytest.mark.parametrize("message", VALID, ids=lambda m: type(m).__name__)
def test_messages_round_trip(message):
    frame = framing.encode(message)
    length = framing.header_length(frame[:4], framing.MAX_STREAM_HEADER_BYTES)
    assert length == len(frame) - 4
    assert framing.decode_stream(frame[4:]) == message


def test_header_length_is_bounded_before_allocation():
    with pytest.raises(ProtocolError, match="frame header of 4294967295 bytes is outside 1..65536"):
        framing.header_length(b"\xff\xff\xff\xff", framing.MAX_STREAM_HEADER_BYTES)
    with pytest.raises(ProtocolError, match="outside"):
        framing.header_length(b"\x00\x00\x00\x00", framing.MAX_STREAM_HEADER_BYTES)


def test_field_bounds_are_enforced_with_the_field_path():
    bad = framing.encode(Data(1, 2, 3, 10, 0))[4:].replace(b"\x0a", b"\xce\x7f\xff\xff\xff", 1)  # nbytes = 2**31-1
    with pytest.raises(ProtocolError, match=r"<= 1073741824 - at `\$\[4\]`"):
        framing.decode_stream(bad)


def test_a_handshake_message_is_not_a_stream_message():
    hello = framing.encode(Hello(1, b"s" * 16, 0, 1, "f", b"n" * 32))[4:]
    with pytest.raises(ProtocolError, match="invalid message"):
        framing.decode_stream(hello)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=256))
def test_random_bytes_only_ever_raise_protocol_error(data):
    for decode in (framing.decode_stream, framing.decode_handshake):
        try:
            decode(data)
        except ProtocolError:
            pass


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(VALID), st.integers(min_value=0), st.integers(min_value=0, max_value=255))
def test_mutated_messages_decode_or_raise_protocol_error(message, position, value):
    body = bytearray(framing.encode(message)[4:])
    body[position % len(body)] = value
    try:
        decoded = framing.decode_stream(bytes(body))
    except ProtocolError:
        return
    assert type(decoded) in {type(m) for m in VALID}


def _pair():
    a, b = socket.socketpair()
    return TcpConnection(a, "receiver-side"), TcpConnection(b, "sender-side")  # each named for its peer


def _handshake(client_layout, server_layout, client_secret, server_secret):
    client, server = _pair()
    outcome = {}

    def serve():
        try:
            outcome["server"] = server_handshake(
                server, layout=server_layout, secret=server_secret, welcome=lambda hello: Welcome(99)
            )
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            outcome["server"] = exc

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        outcome["client"] = client_handshake(
            client, layout=client_layout, secret=client_secret, session_id=b"x" * 16, stream_index=0, num_streams=1
        )
    except Exception as exc:  # noqa: BLE001
        outcome["client"] = exc
    thread.join(5)
    client.close()
    server.close()
    return outcome["client"], outcome["server"]


def test_handshake_succeeds_with_equal_secret_and_layout():
    layout = hybrid_layout()
    client, server = _handshake(layout, layout, b"k", b"k")
    assert client == Welcome(99)
    assert isinstance(server, Hello) and server.fingerprint == layout.fingerprint


@pytest.mark.parametrize(
    "client_secret, server_secret, client_says, server_says",
    [
        (
            b"a",
            b"b",
            "receiver at receiver-side failed to prove the shared secret (it has a different secret)",
            "refused us: sender: receiver's proof is wrong",
        ),
        (
            None,
            b"b",
            "sender sent no proof, but this receiver requires a secret",
            "sender sent no proof, but this receiver requires a secret",
        ),
        (b"a", None, "failed to prove the shared secret (it has no secret configured)", "refused us"),
    ],
)
def test_handshake_refuses_wrong_or_missing_secret_on_both_sides(
    client_secret, server_secret, client_says, server_says
):
    layout = hybrid_layout()
    client, server = _handshake(layout, layout, client_secret, server_secret)
    assert isinstance(client, AuthenticationError) and client_says in str(client)
    assert isinstance(server, AuthenticationError) and server_says in str(server)


def test_handshake_explains_a_layout_mismatch_on_both_sides():
    client, server = _handshake(hybrid_layout(state_dim=32), hybrid_layout(state_dim=16), b"k", b"k")
    expected = "KV layout mismatch: layer 0 tensor 'conv': receiver has float32[64, 4], sender has float32[128, 4]"
    assert isinstance(client, LayoutMismatchError) and str(client) == expected
    assert isinstance(server, LayoutMismatchError) and str(server) == expected


def test_wrong_secret_is_checked_before_the_layout():
    client, server = _handshake(hybrid_layout(state_dim=32), hybrid_layout(state_dim=16), None, b"k")
    assert isinstance(client, AuthenticationError)
    assert isinstance(server, AuthenticationError)


def _serve_bytes(data: bytes, secret):
    """Feed ``data`` to a receiver's handshake as if a peer had sent it; what comes out."""
    client, server = _pair()
    client.sock.sendall(data)
    client.sock.shutdown(socket.SHUT_WR)
    server.set_timeout(2)
    try:
        return server_handshake(server, layout=hybrid_layout(), secret=secret, welcome=lambda hello: Welcome(1))
    except Exception as exc:  # noqa: BLE001 - inspected by the caller
        return exc
    finally:
        client.close()
        server.close()


def _valid_opening() -> bytes:
    return framing.encode(Hello(1, b"s" * 16, 0, 1, hybrid_layout().fingerprint, b"n" * 32))


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=512))
def test_handshake_given_random_bytes_only_raises_kvwire_errors(data):
    from kvwire import KVWireError

    outcome = _serve_bytes(data, b"k")
    assert isinstance(outcome, KVWireError), repr(outcome)


@settings(max_examples=150, deadline=None)
@given(st.integers(min_value=0), st.integers(min_value=0, max_value=255), st.binary(max_size=64))
def test_handshake_given_a_mutated_hello_only_raises_kvwire_errors(position, value, tail):
    from kvwire import KVWireError

    opening = bytearray(_valid_opening())
    opening[position % len(opening)] = value
    outcome = _serve_bytes(bytes(opening) + tail, b"k")
    assert isinstance(outcome, (KVWireError, Hello)), repr(outcome)
    if isinstance(outcome, Hello):  # a mutation that still decodes must not get past the proof
        raise AssertionError("handshake accepted a peer that never proved the secret")
