"""The wire layer fed bytes directly: framing bounds and decoders (the handshake: test_handshake.py)."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvwire import ProtocolError
from kvwire.wire import framing
from kvwire.wire.messages import MAX_JOINED_LAYERS, Abort, Ack, Acks, Data, Hello, Layers, Open

VALID = [
    Open(3, "req-1", 4096, "none", 1 << 22, 30.0),
    Data(3, 1, 0, 1024, 2**64 - 1),
    Layers(3, [4, 0, 2], 3072, 2**64 - 1),
    Ack(3, 1),
    Acks(3, [4, 0, 2]),
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


def test_a_layers_frame_names_two_to_4096_layers():
    for layers, said in (([1], "length >= 2"), (list(range(MAX_JOINED_LAYERS + 1)), "length <= 4096"),
                         ([0, -1], ">= 0")):
        with pytest.raises(ProtocolError, match=said):
            framing.decode_stream(framing.encode(Layers(1, layers, 10, 0))[4:])


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
