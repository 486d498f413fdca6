"""The control message that frames a UCX send (kvwire.transport.ucx.control), without UCX:
what one side encodes the other decodes, and a message that breaks the rules is refused
with words the connection puts after "UCX control message from PEER"."""

import struct

import pytest

from kvwire.transport.ucx import control


def test_inline_bytes_and_large_message_lengths_come_back_in_order():
    message = control.encode([3, -4096, 5, -1], [b"abc", b"hello"])
    buffer = bytearray(control.CTRL_BYTES)  # the receiver's posted control buffer is larger than the message
    buffer[: len(message)] = message
    segments, num_large = control.decode(buffer)
    assert [bytes(s) if isinstance(s, memoryview) else s for s in segments] == [b"abc", 4096, b"hello", 1]
    assert num_large == 2


def test_an_empty_send_is_a_message_of_no_segments():
    assert control.decode(control.encode([], [])) == ([], 0)


@pytest.mark.parametrize(
    ("message", "words"),
    [
        (struct.pack("<I", control.MAX_SEGMENTS + 1), f"lists {control.MAX_SEGMENTS + 1} segments"),
        (control.UNBLOCK, f"lists {0xFFFFFFFF} segments"),  # what a worker sends itself: never a peer's message
        (struct.pack("<Iq", 1, 0), "is malformed"),  # a zero length
        (struct.pack("<Iq", 1, 10) + b"short", "is malformed"),  # more inline bytes announced than carried
        (struct.pack("<I", 2) + struct.pack("<q", 1), "is malformed"),  # fewer lengths than announced
        (b"\x01", "is malformed"),
    ],
)
def test_a_message_that_breaks_the_rules_is_refused(message, words):
    with pytest.raises(control.ControlError) as refused:
        control.decode(message)
    assert str(refused.value) == words
