"""Length-prefixed framing: ``[u32 big-endian header length][MessagePack header][payload]``.

Only a Data header is followed by payload (its ``nbytes``). Decoding is bounded: a
header longer than the caller's limit, or bytes that are not a valid message, raise
ProtocolError before anything is allocated for them.
"""

from __future__ import annotations

import struct

import msgspec

from ..errors import RemoteProtocolError
from .messages import HandshakeMessage, StreamMessage

PREFIX = struct.Struct(">I")
PREFIX_BYTES = PREFIX.size
MAX_STREAM_HEADER_BYTES = 64 * 1024
MAX_HANDSHAKE_HEADER_BYTES = 64 * 1024 * 1024  # an Auth may carry a whole layout
MAX_WELCOME_HEADER_BYTES = MAX_STREAM_HEADER_BYTES + 4096  # a Welcome may carry 64 KiB of info

_encoder = msgspec.msgpack.Encoder()
_stream_decoder = msgspec.msgpack.Decoder(StreamMessage)
_handshake_decoder = msgspec.msgpack.Decoder(HandshakeMessage)

def encode(message: msgspec.Struct) -> bytes:
    """Prefix + header bytes of one message."""
    body = _encoder.encode(message)
    return PREFIX.pack(len(body)) + body


def header_length(prefix: bytes | bytearray | memoryview, limit: int) -> int:
    """Length announced by a prefix, checked against ``limit``."""
    (length,) = PREFIX.unpack(prefix)
    if length == 0 or length > limit:
        raise RemoteProtocolError(f"frame header of {length} bytes is outside 1..{limit}")
    return length


def _decode(decoder: msgspec.msgpack.Decoder, body: bytes | memoryview):
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise RemoteProtocolError(f"invalid message: {exc}") from None
    except (msgspec.DecodeError, ValueError) as exc:  # ValueError: e.g. invalid UTF-8 in a tag
        raise RemoteProtocolError(f"undecodable message: {exc}") from None


def decode_stream(body: bytes | memoryview) -> StreamMessage:
    return _decode(_stream_decoder, body)


def decode_handshake(body: bytes | memoryview) -> HandshakeMessage:
    return _decode(_handshake_decoder, body)
