"""Bad peers and a bad network: each gets the right error, and the receiver keeps serving."""

import logging
import os
import socket
import threading
import time

import numpy as np
import pytest

from kvwire import (
    AuthenticationError,
    IntegrityError,
    KVLayout,
    PeerLostError,
    Receiver,
    RequestRejected,
    Sender,
    TensorSpec,
    TransferTimeout,
    landing,
)
from kvwire.testing.relay import Fault, FaultyRelay
from kvwire.transport.ucx import ucx_available
from kvwire.wire import framing
from kvwire.wire.checksum import frame_checksum
from kvwire.wire.messages import Abort, Ack, Data

from .support import assert_same_bytes, random_kv, send_all, still_serves, tls_contexts, wait_until

SECRET = b"test-secret"


def test_receiver_without_secret_is_refused_by_a_sender_with_one(layout):
    with Receiver(layout) as open_rx:
        with pytest.raises(
            AuthenticationError, match="failed to prove the shared secret \\(it has no secret configured\\)"
        ):
            Sender(layout, open_rx.address, secret=SECRET)


@pytest.mark.parametrize(
    "garbage",
    [os.urandom(4096), b"\x00\x00\x00\x05hello", b"\xff\xff\xff\xff" + b"x" * 100, b"GET / HTTP/1.1\r\n\r\n"],
    ids=["random", "bad-msgpack", "huge-length", "http"],
)
def test_garbage_on_the_port_is_dropped_with_a_logged_reason(layout, receiver, caplog, garbage):
    host, port = receiver.address.rsplit(":", 1)
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(garbage)
        sock.settimeout(5)
        try:
            while sock.recv(65536):
                pass  # the receiver closes on us
        except ConnectionResetError:
            pass
    wait_until(lambda: "refused connection from" in caplog.text)
    assert "ProtocolError" in caplog.text or "PeerLostError" in caplog.text
    still_serves(receiver, layout, SECRET)


def test_garbage_after_a_valid_handshake_fails_only_that_session(layout, receiver, sender, caplog):
    kv = random_kv(layout, 16)
    good = sender.open("good", 16)
    good.send_layer(0, kv[0])
    with Sender(layout, receiver.address, secret=SECRET, streams=1) as bad:
        bad.connections[0].send([b"\x00\x00\x00\x03abc"])
        wait_until(lambda: "ProtocolError" in caplog.text)
    for i in range(1, 4):
        good.send_layer(i, kv[i])
    good.finish(timeout=10)
    assert_same_bytes(receiver.wait("good", timeout=5).layer(3), kv[3])


@pytest.mark.parametrize(
    "tokens, chunk_bytes, flip_at",
    [
        (4000, 4 << 20, 200_000),  # the MLA layer, ~640 KB, is one chunk: checked by the reader
        (40_000, 1 << 20, 100_000),  # ~5 MiB in 1 MiB chunks: the first is checked while the next arrives
    ],
    ids=["one-chunk", "checked-while-the-next-arrives"],
)
def test_a_flipped_bit_fails_the_request_with_integrity_error(layout, receiver, tokens, chunk_bytes, flip_at):
    big = random_kv(layout, tokens)
    with FaultyRelay(receiver.address, Fault(flip_bit_at=flip_at)) as relay:
        with Sender(layout, relay.address, secret=SECRET, streams=1, chunk_bytes=chunk_bytes) as tx:
            xfer = tx.open("flipped", tokens)
            for i, tensors in enumerate(big):
                xfer.send_layer(i, tensors)
            with pytest.raises(IntegrityError, match="request 'flipped' layer 3 chunk 0: checksum mismatch") as said:
                xfer.finish(timeout=10)
            assert said.value.remote and (said.value.request_id, said.value.peer) == ("flipped", relay.address)
            with pytest.raises(IntegrityError, match="checksum mismatch, the data was corrupted in transit") as found:
                receiver.wait("flipped", timeout=5).wait_layer(3, timeout=5)
            assert not found.value.remote and (found.value.request_id, found.value.layer, found.value.chunk) == (
                "flipped", 3, 0)
            clean = random_kv(layout, 10)
            send_all(tx, "clean-after-flip", clean, 10)  # the same connection keeps working
            with receiver.wait("clean-after-flip", timeout=5) as got:
                assert_same_bytes(got.layer(3), clean[3])
    assert receiver.bytes_in_use == 0
    still_serves(receiver, layout, SECRET)


def test_a_dropped_connection_resumes_from_the_last_verified_layer(layout, receiver, caplog):
    kv = random_kv(layout, 4000)  # layers 0-2 are ~10 KB each, the MLA layer 640 KB
    with FaultyRelay(receiver.address, Fault(cut_at=300_000, connections=1)) as relay:
        with Sender(layout, relay.address, secret=SECRET, streams=1) as tx:
            xfer = tx.open("cut", 4000)
            for i in range(3):
                xfer.send_layer(i, kv[i])
            wait_until(lambda: xfer.layer_sent(2))  # verified by the receiver before the drop
            xfer.send_layer(3, kv[3])  # the connection drops 300 KB in, inside this layer
            stats = xfer.finish(timeout=10)
        assert relay.num_connections == 2
    with receiver.wait("cut", timeout=5) as got:
        for i, tensors in enumerate(kv):
            assert_same_bytes(got.layer(i), tensors)
    assert "resumed" in caplog.text
    # only the layer without an ack went again, not the whole request
    assert stats.resent_bytes == layout.plan(3, 4000).nbytes
    assert stats.wire_bytes == layout.wire_bytes(4000) + stats.resent_bytes
    assert receiver.bytes_in_use == 0


def test_an_ack_lost_with_its_connection_is_given_again_after_the_engine_released_the_request(layout, receiver):
    """The receiver verified every layer, acked them, and the engine released the request;
    one ack died with its connection. The resumed sender re-sends that layer: the receiver,
    which no longer holds the request, must ack it again (it drained it silently, and the
    sender's finish() ran into its deadline for bytes that had arrived: 3 of ~400 drops in a
    soak). That it is said once for the layer, not once per chunk of it, is the receiving
    core's rule: test_receiving_core.py."""
    lost = []

    def lose_the_first_ack_of_layer_1(msg) -> bool:
        if isinstance(msg, Ack) and msg.layer == 1 and not lost:
            lost.append(msg)  # lost with the connection that carried it
            return True
        return False

    def hold_its_next_acks(msg) -> float:  # meanwhile the writer re-sends every chunk of the layer
        return 0.3 if isinstance(msg, Ack) and msg.layer == 1 and lost else 0.0

    kv = random_kv(layout, 40, seed=2)
    assert layout.plan(1, 40).nbytes > 2 * 4096  # layer 1 goes again in three chunks
    fault = Fault(drop_reply=lose_the_first_ack_of_layer_1, delay_reply=hold_its_next_acks)
    with FaultyRelay(receiver.address, fault) as relay, \
            Sender(layout, relay.address, secret=SECRET, streams=1, chunk_bytes=4096) as tx:
        xfer = tx.open("late-ack", 40, timeout=10)
        for i, tensors in enumerate(kv):
            xfer.send_layer(i, tensors)
        with receiver.wait("late-ack", timeout=5) as got:
            for i, tensors in enumerate(kv):
                assert_same_bytes(got.layer(i, timeout=5), tensors)
        wait_until(lambda: lost and all(xfer.layer_sent(i) for i in (0, 2, 3)), what="every other layer acked")
        tx.connections[0].close()  # the connection that carried the ack
        stats = xfer.finish(timeout=5)
    assert stats.resent_bytes == layout.plan(1, 40).nbytes  # the one unacked layer went again
    assert [m.layer for m in relay.replies if isinstance(m, Ack) and m.layer == 1]  # and was acked again


def test_a_refusal_that_never_reached_the_sender_is_given_again(layout, receiver):
    """A request refused at Open whose Abort was lost (with its connection) is refused
    again when its data comes by, rather than drained in silence until the deadline."""
    lost = []

    def lose_the_first_abort(msg) -> bool:
        if isinstance(msg, Abort) and not lost:
            lost.append(msg)
            return True
        return False

    kv = random_kv(layout, 40, seed=4)
    with FaultyRelay(receiver.address, Fault(drop_reply=lose_the_first_abort)) as relay, \
            Sender(layout, relay.address, secret=SECRET, streams=1) as tx:
        first = tx.open("twice", 40)
        first.send_layer(0, kv[0])
        receiver.wait("twice", timeout=5)  # in flight: the receiver holds the id
        second = tx.open("twice", 40, timeout=10)
        with pytest.raises(RequestRejected, match="'twice' is already in flight"):  # from send_layer or finish
            for i, tensors in enumerate(kv):
                second.send_layer(i, tensors)
            second.finish(timeout=5)
        assert lost and lost[0].kind == "rejected"
        first.abort()


def test_a_link_that_keeps_dropping_fails_by_the_deadline_on_both_sides(layout, receiver):
    with FaultyRelay(receiver.address, Fault(cut_at=300_000)) as relay:
        with Sender(layout, relay.address, secret=SECRET, streams=1) as tx:
            xfer = tx.open("cut-forever", 4000, timeout=2.0)
            for i, tensors in enumerate(random_kv(layout, 4000)):
                xfer.send_layer(i, tensors)
            start = time.monotonic()
            # PeerLostError when the deadline finds the connection down, else TransferTimeout
            with pytest.raises((TransferTimeout, PeerLostError)):
                xfer.finish()
            assert time.monotonic() - start < 3
    with pytest.raises((TransferTimeout, PeerLostError)):
        receiver.wait("cut-forever", timeout=5).wait_layer(3, timeout=5)
    wait_until(lambda: receiver.bytes_in_use == 0)
    still_serves(receiver, layout, SECRET)


def test_a_stalled_link_times_out_within_the_deadline(layout, receiver):
    with FaultyRelay(receiver.address, Fault(stall_at=300_000)) as relay:
        with Sender(layout, relay.address, secret=SECRET, streams=1) as tx:
            xfer = tx.open("stalled", 4000, timeout=1.0)
            for i, tensors in enumerate(random_kv(layout, 4000)):
                xfer.send_layer(i, tensors)
            start = time.monotonic()
            with pytest.raises(TransferTimeout):
                xfer.finish()
            assert time.monotonic() - start < 2.5
            with pytest.raises(TransferTimeout, match="request 'stalled' from .* missed its deadline"):
                receiver.wait("stalled", timeout=5).wait_layer(3, timeout=5)
    wait_until(lambda: receiver.bytes_in_use == 0)
    still_serves(receiver, layout, SECRET)


@pytest.mark.skipif(
    not __import__("shutil").which("openssl"), reason="needs the openssl CLI to make a test certificate"
)
def test_tls_transfer_round_trips_and_an_untrusted_certificate_is_refused(layout, tls_files, caplog):
    server_ctx, client_ctx = tls_contexts(tls_files)
    kv = random_kv(layout, 300)
    with Receiver(layout, secret=SECRET, ssl_context=server_ctx) as rx:
        with Sender(layout, rx.address, secret=SECRET, ssl_context=client_ctx, streams=2) as tx:
            send_all(tx, "tls", kv, 300)
        with rx.wait("tls", timeout=5) as got:
            for i, tensors in enumerate(kv):
                assert_same_bytes(got.layer(i), tensors)
        _, untrusting = tls_contexts(tls_files, client_trusts="other")
        with pytest.raises(AuthenticationError, match="TLS certificate of .* rejected"):
            Sender(layout, rx.address, secret=SECRET, ssl_context=untrusting)
        with pytest.raises(PeerLostError):
            Sender(layout, rx.address, secret=SECRET)  # plaintext to a TLS port


def test_logging_names_the_peer(layout, receiver, caplog):
    caplog.set_level(logging.WARNING, logger="kvwire")
    with pytest.raises(AuthenticationError):
        Sender(layout, receiver.address, secret=b"nope")
    wait_until(lambda: "refused connection from 127.0.0.1:" in caplog.text)


@pytest.mark.parametrize("backend", ["tcp", "ucx"])
def test_a_copy_of_a_chunk_awaiting_its_check_is_drained_not_written_over_it(backend, monkeypatch):
    # A resumed sender re-sends every chunk of a layer it had no ack for. A chunk received
    # in place and still queued for its check must not be overwritten by that copy: had
    # it been (here the copy carries other bytes, under their own valid checksum), the
    # check would read bytes it was not given, and the layer could be reported ready
    # while they were still being written.
    if backend == "ucx" and not ucx_available():
        pytest.skip("ucxx is not importable (install kvwire[ucx])")
    one = KVLayout([{"x": TensorSpec((1024,), "uint8", per_token=True)}])
    tokens, chunk = 2048, 1 << 20  # two 1 MiB chunks: the first is checked by the verifier thread
    original = np.random.default_rng(1).integers(0, 256, tokens * 1024, dtype=np.uint8)
    copy = original.copy()
    copy[:chunk] ^= 0xFF
    held, release = threading.Event(), threading.Event()
    real = landing.checksum_matches

    def held_in_the_verifier(msg, pieces, *rest):
        if threading.current_thread().name.startswith("kvwire-rx-verify"):
            held.set()
            release.wait(10)
        return real(msg, pieces, *rest)

    monkeypatch.setattr(landing, "checksum_matches", held_in_the_verifier)
    with Receiver(one, "127.0.0.1:0", backend=backend, secret=SECRET) as rx:
        with Sender(one, rx.address, backend=backend, secret=SECRET, streams=2, chunk_bytes=chunk) as tx:
            xfer = tx.open("resent", tokens)  # (its Opens go out on both streams)
            got = rx.wait("resent", timeout=10)

            def data(stream: int, payload: np.ndarray, index: int) -> None:
                piece = payload[index * chunk : (index + 1) * chunk]
                checksum = frame_checksum(xfer.rid, 0, index, [piece], chunk)
                tx.connections[stream].send([framing.encode(Data(xfer.rid, 0, index, chunk, checksum)), piece])

            data(0, original, 0)
            assert held.wait(10), "the first chunk was not handed to the verifier"
            data(1, copy, 0)  # the re-sent copy, on the other stream, while the first awaits its check
            time.sleep(0.3)  # (its reader drains it, or, wrongly, writes it in place)
            release.set()
            data(0, original, 1)
            got.wait_done(timeout=10)
            assert np.array_equal(got.layer(0)["x"].reshape(-1), original)
            xfer.abort("the test sent the frames itself")
            got.release()
