"""The control message that frames a send over UCX, testable without UCX.

Each ``send(buffers)`` of a connection becomes one control message followed by one tag
message per large buffer. The control message holds the number of segments (u32), each
segment's length (i64: positive for bytes carried inline in this message, negative for a
large buffer that follows as its own message), then the inline bytes. A receiver posts
one control receive of ``CTRL_BYTES`` ahead, so a message never exceeds that.
"""

from __future__ import annotations

import struct

# A control message's most bytes: a small request's layers (inline buffers) travel in one
# message, not one per 256 KiB (perf requests over UCX: CPU per request ~1.85 -> ~1.3 ms at
# each end; two such buffers per connection are posted ahead). Protocol 7.
CTRL_BYTES = 1024 * 1024
MAX_SEGMENTS = 4096
INLINE_ROOM = CTRL_BYTES - 8 * MAX_SEGMENTS  # inline bytes one message carries at most
UNBLOCK = b"\xff\xff\xff\xff"  # what a worker sends itself to end a receive: a count no peer may send
_COUNT = struct.Struct("<I")


class ControlError(ValueError):
    """A control message that breaks the rules; the text completes "UCX control message from PEER ..."."""


def encode(lengths: list[int], inline: list) -> bytes:
    """A control message announcing ``lengths`` (inline > 0, large < 0) and carrying the
    ``inline`` buffers, in order."""
    return b"".join([_COUNT.pack(len(lengths)), struct.pack(f"<{len(lengths)}q", *lengths), *inline])


def decode(message) -> tuple[list, int]:
    """(segments, number of large messages) that ``message`` announces: a memoryview of
    ``message`` per inline segment and the length (int) of each large message, in order.
    ControlError if it lists too many segments, a zero length, or more inline bytes than
    it holds."""
    data = memoryview(message).cast("B")
    try:
        (count,) = _COUNT.unpack_from(data, 0)
        if count > MAX_SEGMENTS:
            raise ControlError(f"lists {count} segments")
        lengths = struct.unpack_from(f"<{count}q", data, _COUNT.size)
    except struct.error:
        raise ControlError("is malformed") from None
    position = _COUNT.size + 8 * count
    segments, num_large = [], 0
    for length in lengths:
        if length > 0:
            if position + length > len(data):
                raise ControlError("is malformed")
            segments.append(data[position : position + length])
            position += length
        elif length < 0:
            segments.append(-length)
            num_large += 1
        else:
            raise ControlError("is malformed")
    return segments, num_large
