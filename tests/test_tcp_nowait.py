"""Writing without waiting on a TCP connection (``Capabilities.nonblocking``), and what the
Sender builds on it: a small layer written by the engine's own thread, whatever the socket
did not take finished by the stream's writer. Real sockets throughout."""

from __future__ import annotations

import socket
import ssl
import threading

import numpy as np
import pytest

from kvwire import KVLayout, Receiver, Sender, TensorSpec
from kvwire.transport import TcpOptions
from kvwire.transport.tcp import TcpConnection

from .support import assert_same_bytes, random_kv


def pair(buffer_bytes: int | None = None) -> tuple[TcpConnection, TcpConnection]:
    a, b = socket.socketpair()
    if buffer_bytes is not None:
        for sock in (a, b):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffer_bytes)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer_bytes)
    return TcpConnection(a, "writer"), TcpConnection(b, "reader")


def receive_exactly(conn: TcpConnection, nbytes: int) -> bytes:
    into = bytearray(nbytes)
    conn.recv_into(memoryview(into))
    return bytes(into)


def test_send_now_writes_what_fits_and_hands_back_the_rest_in_order():
    writer, reader = pair(buffer_bytes=8192)
    payload = np.random.default_rng(0).integers(0, 256, 4 << 20, dtype=np.uint8)
    pieces = [b"head", memoryview(payload)[: 1 << 20], memoryview(payload)[1 << 20 :]]
    left = writer.send_now(pieces)  # nobody reads: the socket takes a little, and this returns
    assert 0 < sum(map(len, left)) < 4 + payload.nbytes
    got = {}
    drain = threading.Thread(target=lambda: got.setdefault("bytes", receive_exactly(reader, 4 + payload.nbytes)))
    drain.start()
    writer.send(left)  # what was handed back completes the stream, nothing twice or lost
    drain.join(10)
    assert got["bytes"] == b"head" + payload.tobytes()


def test_a_socket_with_a_timeout_or_tls_is_never_written_without_waiting():
    writer, _reader = pair()
    writer.set_timeout(5.0)
    assert [bytes(view) for view in writer.send_now([b"abc"])] == [b"abc"]
    context = ssl.create_default_context()
    a, b = socket.socketpair()
    tls = context.wrap_socket(a, server_hostname="x", do_handshake_on_connect=False)
    assert TcpConnection(tls, "tls").capabilities.nonblocking is False
    assert TcpConnection(b, "plain").capabilities.nonblocking is True
    tls.close()
    b.close()


@pytest.mark.parametrize("streams", [1, 3])
def test_small_layers_written_by_the_engine_thread_arrive_exactly_through_a_full_socket(streams):
    """8 KiB socket buffers: each layer is more than a direct write can hand to the kernel
    at once, so every layer's rest goes through the stream's writer."""
    layout = KVLayout([{"state": TensorSpec((48, 1024), "float32")}, {"k": TensorSpec((4, 64), "bfloat16", per_token=True)}] * 3)
    small = TcpOptions(buffer_bytes=8192)
    kv = [random_kv(layout, 100, seed) for seed in range(12)]
    with Receiver(layout, "127.0.0.1:0", transport_options=small) as rx, \
            Sender(layout, rx.address, streams=streams, transport_options=small) as tx:
        transfers = []
        for i, layers in enumerate(kv):
            xfer = tx.open(f"r{i}", 100)
            for layer, tensors in enumerate(layers):
                xfer.send_layer(layer, tensors)
            transfers.append(xfer)
        for xfer in transfers:
            xfer.finish(timeout=30)
        for i, layers in enumerate(kv):
            with rx.wait(f"r{i}", timeout=30) as got:
                for layer, tensors in enumerate(layers):
                    assert_same_bytes(got.layer(layer), tensors)
