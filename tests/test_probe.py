"""What a Receiver publishes to probes, and the other layouts it takes: how a prefill rank
learns a decode instance of another tensor-parallel size, then sends it shard pieces."""

import socket
import threading

import pytest

from kvwire import (
    AuthenticationError,
    KVLayout,
    LayoutMismatchError,
    PeerLostError,
    ProtocolError,
    Receiver,
    Sender,
    TensorSpec,
    probe,
)

from .support import assert_same_bytes, random_kv


def layout_of(heads: int) -> KVLayout:
    return KVLayout([{"conv": TensorSpec((heads * 8, 3), "float32")},
                     {"kv": TensorSpec((heads, 2, 16), "bfloat16", per_token=True)}])


def test_a_probe_gets_the_published_info_and_opens_no_session():
    with Receiver(layout_of(2), secret=b"s", info=b'{"tp": 2}') as rx:
        assert probe(rx.address, secret=b"s") == b'{"tp": 2}'
        assert rx.metrics() == {}  # no sender joined


def test_the_largest_info_a_receiver_takes_reaches_a_probe():
    info = bytes(range(256)) * 256  # 64 KiB: Receiver's limit
    with Receiver(layout_of(2), secret=b"s", info=info) as rx:
        assert probe(rx.address, secret=b"s") == info


def test_a_probe_proves_the_secret_like_a_sender():
    with Receiver(layout_of(2), secret=b"s", info=b"private") as rx:
        with pytest.raises(AuthenticationError, match="different secret"):
            probe(rx.address, secret=b"other")
        with pytest.raises(AuthenticationError, match="requires a secret"):
            probe(rx.address)


def test_a_probe_of_something_else_says_so():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    address = "{}:{}".format(*server.getsockname())

    def answer():
        conn, _ = server.accept()
        conn.recv(1024)
        conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        conn.close()

    threading.Thread(target=answer, daemon=True).start()
    with pytest.raises(ProtocolError, match="does not speak kvwire"):
        probe(address, timeout=5)
    server.close()


def test_a_probe_of_nothing_is_peer_lost():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = "{}:{}".format(*s.getsockname())
    with pytest.raises(PeerLostError):
        probe(address, timeout=2)


def test_info_is_bounded():
    with pytest.raises(ValueError, match="at most 65536"):
        Receiver(layout_of(2), info=b"x" * 70000)


def test_a_receiver_takes_each_accepted_layout_in_its_own_sessions():
    own, piece, other = layout_of(2), layout_of(1), layout_of(4)
    with Receiver(own, also_accepted=[piece]) as rx:
        for name, layout in (("whole", own), ("piece", piece)):
            kv = random_kv(layout, 20, seed=3)
            with Sender(layout, rx.address, streams=1) as tx:
                xfer = tx.open(name, 20)
                for i, tensors in enumerate(kv):
                    xfer.send_layer(i, tensors)
                xfer.finish(timeout=30)
            got = rx.wait(name, timeout=30)
            for i, tensors in enumerate(kv):
                assert_same_bytes(got.wait_layer(i, timeout=30), tensors)
            got.release()
        with pytest.raises(LayoutMismatchError, match="layer 0"):
            Sender(other, rx.address, streams=1)
