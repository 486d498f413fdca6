"""FrameReader over a real socket pair: frames come back whole and in order however the
bytes are cut, payloads land exactly, and replies held back go out before it waits."""

from __future__ import annotations

import dataclasses
import itertools
import socket
import threading

import numpy as np
import pytest

from kvwire.errors import PeerLostError, RemoteProtocolError
from kvwire.transport.tcp import TcpConnection
from kvwire.wire import framing
from kvwire.wire.messages import Ack, Data
from kvwire.wire.reader import FrameReader


class ExactReads(TcpConnection):
    """A TCP connection that, like UCX, only fills what it is asked for."""

    capabilities = dataclasses.replace(TcpConnection.capabilities, partial_reads=False)


def pair(kind=TcpConnection):
    a, b = socket.socketpair()
    return TcpConnection(a, "writer"), kind(b, "reader")


def frames(count: int, payload_bytes: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        payload = rng.integers(0, 256, payload_bytes + i, dtype=np.uint8)
        out.append((Data(7, i, 0, payload.nbytes, i), payload))
    return out


def write_in_pieces(conn: TcpConnection, sent, piece_bytes: int) -> threading.Thread:
    """Write every frame, cut into ``piece_bytes`` pieces regardless of frame bounds."""
    stream = b"".join(framing.encode(msg) + payload.tobytes() for msg, payload in sent)

    def run():
        for start in range(0, len(stream), piece_bytes):
            conn.send([stream[start : start + piece_bytes]])

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("kind", [TcpConnection, ExactReads], ids=["partial", "exact"])
@pytest.mark.parametrize("payload_bytes,piece_bytes", [(100, 7), (3000, 1 << 20), (300_000, 65_537)])
def test_frames_come_back_whole_and_in_order_however_the_bytes_are_cut(kind, payload_bytes, piece_bytes):
    writer, conn = pair(kind)
    sent = frames(20, payload_bytes)
    thread = write_in_pieces(writer, sent, piece_bytes)
    reader = FrameReader(conn, framing.MAX_STREAM_HEADER_BYTES, buffer_bytes=4096)
    for i, (msg, payload) in enumerate(sent):
        got = reader.next_message()
        assert got == msg
        into = np.zeros(got.nbytes, np.uint8)
        if i % 3 == 2:
            reader.skip(got.nbytes)  # drained, and the next frame is still found
            continue
        if i % 3 == 1:  # a payload read into several views at once (a layer's tensors)
            cuts = np.linspace(0, got.nbytes, 6).astype(int)
            reader.read_into_many([into[a:b] for a, b in itertools.pairwise(cuts)])
        else:
            half = got.nbytes // 2  # a payload read in two views (two tensors)
            reader.read_into(memoryview(into)[:half])
            reader.read_into(memoryview(into)[half:])
        assert np.array_equal(into, payload)
    thread.join(5)
    writer.close()
    with pytest.raises(PeerLostError, match="closed by the peer"):
        reader.next_message()


def test_replies_held_back_go_out_before_the_reader_waits():
    writer, conn = pair()
    waits = []
    reader = FrameReader(conn, framing.MAX_STREAM_HEADER_BYTES, before_wait=lambda: waits.append(reader.buffered))
    writer.send([framing.encode(Ack(1, layer)) for layer in range(50)])
    got = [reader.next_message() for _ in range(50)]
    assert got == [Ack(1, layer) for layer in range(50)]
    # fifty frames that arrived together took one receive: one wait, and nothing is held across it
    assert waits == [0]
    writer.close()


def test_a_header_longer_than_the_limit_is_refused_before_reading_it():
    writer, conn = pair()
    writer.send([framing.PREFIX.pack(1 << 20)])
    with pytest.raises(RemoteProtocolError, match="outside 1..64"):
        FrameReader(conn, 64).next_message()


def test_many_views_fill_in_order_past_the_systems_limit_of_buffers_per_receive():
    writer, conn = pair()
    payload = np.random.default_rng(3).integers(0, 256, 3000 * 7, dtype=np.uint8)  # 3,000 views > IOV_MAX
    thread = write_in_pieces(writer, [(Data(7, 0, 0, payload.nbytes, 0), payload)], 5000)
    reader = FrameReader(conn, framing.MAX_STREAM_HEADER_BYTES, buffer_bytes=4096)
    assert reader.next_message().nbytes == payload.nbytes
    into = np.zeros((3000, 7), np.uint8)
    reader.read_into_many(list(into))
    assert np.array_equal(into.reshape(-1), payload)
    thread.join(5)


def test_a_peer_closing_mid_payload_is_named_when_reading_many_views():
    writer, conn = pair()
    writer.send([framing.encode(Data(7, 0, 0, 1000, 0)), b"x" * 300])
    reader = FrameReader(conn, framing.MAX_STREAM_HEADER_BYTES, buffer_bytes=4096)
    reader.next_message()
    writer.close()
    with pytest.raises(PeerLostError, match="closed by the peer"):
        reader.read_into_many([np.zeros(500, np.uint8), np.zeros(500, np.uint8)])
