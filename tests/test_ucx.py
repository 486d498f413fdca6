"""The UCX backend's own guarantees, and ``backend="auto"``: choice, fallback, one port for both.

Behaviour shared with TCP (bytes, errors, dead peers) is in test_conformance.py.
"""

import logging
import os
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from kvwire import PeerLostError, ProtocolError, Receiver, Sender, TransferTimeout, device
from kvwire.sender import DEFAULT_CHUNK_BYTES, DEVICE_CHUNK_BYTES
from kvwire.transport import auto, get_backend, ucx
from kvwire.transport.ucx import UcxOptions
from kvwire.transport.ucx.control import CTRL_BYTES
from kvwire.transport.ucx.library import UCXX_WROTE

from .support import ROOT, assert_same_bytes, kill, random_kv, run_program, wait_until

# Each test that needs UCX itself says so; the rest (and tests/test_auto.py) run anywhere.
needs_ucxx = pytest.mark.skipif(not ucx.ucx_available(), reason="ucxx is not importable (install kvwire[ucx])")

SECRET = b"test-secret"


def pair(options=None):
    """(client, server) UcxConnections over loopback."""
    backend = get_backend("ucx")
    listener = backend.listen("127.0.0.1:0", options=options)
    accepted = {}

    def serve():
        accepted["conn"] = listener.start_tls(listener.accept(), 5.0)

    thread = threading.Thread(target=serve)
    thread.start()
    client = backend.connect(listener.address, timeout_s=5.0, options=options)
    thread.join(10)
    listener.close()
    return client, accepted["conn"]


def round_trip(layout, address, backend, num_tokens=120, options=None):
    kv = random_kv(layout, num_tokens, seed=11)
    with Sender(layout, address, backend=backend, streams=2, secret=SECRET, transport_options=options) as tx:
        names = tx.backend_names
        xfer = tx.open("auto-rt", num_tokens)
        for i, tensors in enumerate(kv):
            xfer.send_layer(i, tensors)
        xfer.finish(timeout=10)
    return kv, names


# -- the byte stream ----------------------------------------------------------------------


@needs_ucxx
def test_reads_need_not_match_writes():
    client, server = pair()
    try:
        big = np.random.default_rng(0).integers(0, 256, 3 << 20, dtype=np.uint8)
        small = [
            bytes([i % 256]) * (i % 200 + 1) for i in range(3000)
        ]  # more inline bytes than one control message holds
        payload = b"".join(small)
        writer = threading.Thread(target=lambda: client.send([b"head", big, *small, memoryview(big)[:100]]))
        writer.start()
        got = np.empty(4 + len(big) + len(payload) + 100, dtype=np.uint8)
        view = memoryview(got)
        for step in (4, 1000, 1 << 20, 7):  # smaller than the large message: it is staged
            server.recv_into(view[:step])
            view = view[step:]
        server.recv_into(view)
        writer.join(10)
        assert got.tobytes() == b"head" + big.tobytes() + payload + big[:100].tobytes()
    finally:
        client.close()
        server.close()


@needs_ucxx
def test_close_wakes_a_blocked_reader_with_peer_lost():
    client, server = pair()
    errors = []

    def reader():
        try:
            server.recv_into(memoryview(bytearray(10)))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    thread = threading.Thread(target=reader)
    thread.start()
    time.sleep(0.2)  # (not proof of anything: gives the reader time to block before the close)
    start = time.monotonic()
    server.close()
    thread.join(5)
    assert not thread.is_alive() and time.monotonic() - start < 2
    assert isinstance(errors[0], PeerLostError)
    client.close()


@needs_ucxx
def test_the_peer_closing_fails_a_reader_but_delivers_what_was_sent_first():
    client, server = pair()
    client.send([b"last words"])
    client.close()
    buf = memoryview(bytearray(10))
    server.recv_into(buf)
    assert bytes(buf) == b"last words"
    with pytest.raises(PeerLostError):
        server.recv_into(buf)
    server.close()


@needs_ucxx
def test_a_send_larger_than_the_window_returns_before_the_peer_reads_and_the_next_one_waits():
    # The newest send stays in flight whatever its size (a 64 MiB CUDA chunk against the
    # 16 MiB window): the sender prepares its next chunk meanwhile. The window then holds
    # the sends before it: a second send waits until the peer has taken the first.
    client, server = pair(UcxOptions(send_window_bytes=1 << 20))
    try:
        first, second = (np.full(4 << 20, value, dtype=np.uint8) for value in (1, 2))
        sent = []
        writer = threading.Thread(
            target=lambda: [client.send([first]), sent.append(1), client.send([second]), sent.append(2)]
        )
        writer.start()
        wait_until(lambda: sent, what="the first send returning")
        assert sent == [1], "the first send waited for the peer to read"
        wait_until(lambda: client.window_waits >= 1, what="the second send waiting on the window")
        assert sent == [1], "the second send went on while the first held more than the window"
        got = np.empty(8 << 20, dtype=np.uint8)
        server.recv_into(memoryview(got))
        writer.join(10)
        assert sent == [1, 2]
        assert (got[: 4 << 20] == 1).all() and (got[4 << 20 :] == 2).all()
    finally:
        client.close()
        server.close()


@needs_ucxx
def test_send_now_posts_control_messages_and_hands_back_layers_and_a_full_window():
    # An engine's thread posts a request's Open itself (no writer woken; posting never
    # waits for the peer). A layer, or anything while the window is full, comes back
    # whole and in order for the stream's writer, which joins what queued behind it.
    client, server = pair(UcxOptions(send_window_bytes=1 << 20))
    try:
        assert client.capabilities.nonblocking
        layer = np.full(64 << 10, 7, dtype=np.uint8)
        left = client.send_now([b"open", layer])
        assert len(left) == 2 and bytes(left[0]) == b"open" and np.shares_memory(np.frombuffer(left[1], np.uint8), layer)
        assert client.send_now([b"open"]) == []  # nobody reads yet: posted all the same
        big = np.full(4 << 20, 1, dtype=np.uint8)
        client.send([big])  # in flight, unread: more than the window
        assert [bytes(view) for view in client.send_now([b"next"])] == [b"next"]
        got = np.empty(4 + (4 << 20), dtype=np.uint8)
        server.recv_into(memoryview(got))
        assert bytes(got[:4]) == b"open" and (got[4:] == 1).all()
        wait_until(lambda: client.send_now([b"next"]) == [], what="the window emptying")
        tail = bytearray(4)
        server.recv_into(memoryview(tail))
        assert bytes(tail) == b"next"
    finally:
        client.close()
        server.close()
    with pytest.raises(PeerLostError, match="closed"):
        client.send_now([b"after close"])


@needs_ucxx
@pytest.mark.parametrize("sizes", [
    [40, 0, 60, 4000, 1000, 204800, 2, 11],  # inline bytes over several buffers, a large message whole
    [5100 + 204800, 13],  # inline bytes, then a large message, into one buffer
    [100, 100000, 104800, 5013],  # a large message across two buffers (received aside)
])
def test_recv_into_many_fills_each_buffer_in_order_whatever_the_messages(sizes):
    # A frame's payload lands in one buffer per tensor; the sender's writes are cut into
    # inline segments and large messages at other places.
    client, server = pair()
    try:
        rng = np.random.default_rng(len(sizes))
        pieces = [rng.integers(0, 256, n, dtype=np.uint8) for n in (100, 5000, 204800, 3)]
        client.send(pieces)
        client.send([b"0123456789"])
        buffers = [np.zeros(n, dtype=np.uint8) for n in sizes]
        server.recv_into_many(buffers)
        assert np.concatenate(buffers).tobytes() == b"".join(p.tobytes() for p in pieces) + b"0123456789"
    finally:
        client.close()
        server.close()


@needs_ucxx
def test_a_read_times_out_with_transfer_timeout():
    client, server = pair()
    server.set_timeout(0.3)
    start = time.monotonic()
    with pytest.raises(TransferTimeout):
        server.recv_into(memoryview(bytearray(10)))
    assert time.monotonic() - start < 1.5
    with pytest.raises((PeerLostError, TransferTimeout)):  # the stream is broken after a timeout
        server.recv_into(memoryview(bytearray(10)))
    client.close()
    server.close()


@needs_ucxx
def test_peers_use_ucx_error_handling_unless_shared_memory_is_asked_for(layout):
    client, server = pair()
    assert client.transport == server.transport == "ucx-net"
    writer = threading.Thread(target=client.send, args=([b"x" * 100_000],))  # returns once taken
    writer.start()
    buf = memoryview(bytearray(100_000))
    server.recv_into(buf)
    writer.join(10)
    assert bytes(buf) == b"x" * 100_000
    client.close()
    server.close()
    # Both sides must opt in to shared memory (endpoints without UCX error handling).
    client, server = pair(ucx.UcxOptions(shared_memory=True))
    assert client.transport == server.transport == "ucx-local"
    client.close()
    server.close()
    # and across processes, by default
    with Receiver(layout, backend="ucx", secret=SECRET) as rx:
        proc = run_program("ucx_sender", rx.address)
        try:
            out, err = proc.communicate(timeout=60)
        finally:
            kill(proc)
        assert out.strip() == "ucx-net,ucx-net", err
        with rx.wait("net", timeout=10) as got:
            for i, tensors in enumerate(random_kv(layout, 300, seed=4)):
                assert_same_bytes(got.layer(i), tensors)


@needs_ucxx
def test_a_receiver_survives_senders_killed_mid_transfer_and_serves_the_next(layout):
    """Regression: with shared memory and no UCX error handling, a sender SIGKILLed while the
    receiver read its memory (CMA) made UCX abort() the receiver, and one killed while writing
    into the receiver's shared-memory FIFO left that FIFO (and every later transfer) stuck."""
    with Receiver(layout, backend="ucx", secret=SECRET, resume_grace_s=0.5) as rx:
        for n in range(3):
            proc = run_program("layer_by_layer_sender", rx.address, f"killed-{n}")
            try:
                assert proc.stdout.readline().strip() == "sent", proc.stderr.read()
                time.sleep(0.003 * n)
            finally:
                kill(proc)
            try:  # killed mid-transfer: PeerLostError (or, killed after its last ack, complete)
                with rx.wait(f"killed-{n}", timeout=10) as got:
                    got.wait_layer(3, timeout=10)
            except PeerLostError:
                pass
        kv, _ = round_trip(layout, rx.address, "ucx")
        with rx.wait("auto-rt", timeout=10) as got:
            for i, tensors in enumerate(kv):
                assert_same_bytes(got.layer(i), tensors)


@needs_ucxx
def test_ucx_errors_map_to_kvwire_errors():
    from kvwire.transport.ucx.library import load_ucxx

    api, _ = load_ucxx()
    assert isinstance(ucx.map_error(api.UCXConnectionResetError("reset"), "p"), PeerLostError)
    assert isinstance(ucx.map_error(api.UCXEndpointTimeoutError("timeout"), "p"), TransferTimeout)
    assert isinstance(ucx.map_error(api.UCXCanceledError("canceled"), "p"), PeerLostError)
    assert isinstance(ucx.map_error(api.UCXMessageTruncatedError("truncated"), "p"), ProtocolError)


def test_tls_is_refused_by_the_ucx_backend():
    import ssl

    with pytest.raises(ValueError, match="no TLS"):
        get_backend("ucx").listen("127.0.0.1:0", ssl_context=ssl.create_default_context())


# -- receivers ------------------------------------------------------------------------------


@needs_ucxx
def test_garbage_on_a_ucx_port_is_refused_and_the_receiver_keeps_serving(layout, caplog):
    with Receiver(layout, backend="ucx", secret=SECRET) as rx:
        host, port = rx.address.rsplit(":", 1)
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\n\r\n")
            try:
                assert sock.recv(10) == b""
            except ConnectionResetError:
                pass
        wait_until(lambda: "refused connection" in caplog.text, timeout=5, what="the refusal logged")
        kv, names = round_trip(layout, rx.address, "ucx")
        assert names == ["ucx", "ucx"]
        with rx.wait("auto-rt", timeout=10) as got:
            assert_same_bytes(got.layer(3), kv[3])


# -- auto -----------------------------------------------------------------------------------


SHARED = UcxOptions(shared_memory=True)


@needs_ucxx
@pytest.mark.parametrize("rx_backend", ["auto", "ucx"])
def test_auto_uses_ucx_when_it_brings_shared_memory(layout, rx_backend, caplog):
    rx_options = auto.AutoOptions(ucx=SHARED) if rx_backend == "auto" else SHARED
    with Receiver(layout, backend=rx_backend, secret=SECRET, transport_options=rx_options) as rx:
        kv, names = round_trip(layout, rx.address, "auto", options=auto.AutoOptions(ucx=SHARED))
        with rx.wait("auto-rt", timeout=10) as got:
            for i, tensors in enumerate(kv):
                assert_same_bytes(got.layer(i), tensors)
    assert names == ["ucx", "ucx"]
    assert caplog.text.count(f"{rx.address} uses ucx (ucx-local") == 1  # logged once for both connections


@needs_ucxx
@pytest.mark.parametrize("backend", ["ucx", "auto"])
def test_a_sender_left_to_choose_opens_one_ucx_connection(layout, backend):
    """UCX spreads one endpoint over its lanes; more connections only slowed it down."""
    options = auto.AutoOptions(ucx=SHARED) if backend == "auto" else SHARED
    kv = random_kv(layout, 40, seed=5)
    with Receiver(layout, backend=backend, secret=SECRET, transport_options=options) as rx:
        with Sender(layout, rx.address, backend=backend, secret=SECRET, transport_options=options) as tx:
            assert (tx.num_streams, tx.backend_names) == (1, ["ucx"])
            xfer = tx.open("one-stream", 40)
            for i, tensors in enumerate(kv):
                xfer.send_layer(i, tensors)
            xfer.finish(timeout=10)
        with rx.wait("one-stream", timeout=10) as got:
            for i, tensors in enumerate(kv):
                assert_same_bytes(got.layer(i), tensors)


@pytest.mark.parametrize("backend", ["tcp", pytest.param("ucx", marks=needs_ucxx)])
def test_chunks_are_4_mib_unless_told_where_no_gpu_takes_them(layout, backend):
    """64 MiB chunks (DEVICE_CHUNK_BYTES) only where every connection takes CUDA memory
    on a real GPU; the simulator's device memory is host memory and keeps host chunks."""
    options = SHARED if backend == "ucx" else None
    with Receiver(layout, backend=backend, secret=SECRET, transport_options=options) as rx:
        with Sender(layout, rx.address, backend=backend, secret=SECRET, transport_options=options) as tx:
            on_gpu = tx.takes_device_memory and not device.simulated()  # KVWIRE_TEST_DEVICE=cuda on a GPU
            assert tx.chunk_bytes == (DEVICE_CHUNK_BYTES if on_gpu else DEFAULT_CHUNK_BYTES)
            assert (DEFAULT_CHUNK_BYTES, DEVICE_CHUNK_BYTES) == (4 << 20, 64 << 20)
        with Sender(
            layout, rx.address, backend=backend, secret=SECRET, transport_options=options, chunk_bytes=1 << 20
        ) as tx:
            assert tx.chunk_bytes == 1 << 20


@needs_ucxx
def test_auto_prefers_tcp_where_ucx_has_no_fabric_unless_told(layout, caplog):
    from kvwire.transport.ucx import fabrics

    if fabrics():
        pytest.skip(f"this host has UCX fabric transports {fabrics()}: auto rightly uses UCX")
    with Receiver(layout, backend="auto", secret=SECRET) as rx:
        kv, names = round_trip(layout, rx.address, "auto")
        assert names == ["tcp", "tcp"]
        assert caplog.text.count(f"{rx.address} uses tcp (UCX has no fabric to this peer") == 1
        rx.wait("auto-rt", timeout=10).release()
        kv, names = round_trip(layout, rx.address, "auto", options=auto.AutoOptions(ucx_over_tcp=True))
        assert names == ["ucx", "ucx"]
        assert f"{rx.address} uses ucx (ucx-net, fabric: none)" in caplog.text
        with rx.wait("auto-rt", timeout=10) as got:
            assert_same_bytes(got.layer(3), kv[3])


@needs_ucxx
def test_auto_falls_back_to_tcp_for_a_tcp_only_receiver(layout, caplog):
    with Receiver(layout, backend="tcp", secret=SECRET) as rx:
        kv, names = round_trip(layout, rx.address, "auto", options=auto.AutoOptions(ucx=SHARED))  # UCX is tried
        with rx.wait("auto-rt", timeout=10) as got:
            assert_same_bytes(got.layer(3), kv[3])
    assert names == ["tcp", "tcp"]
    assert caplog.text.count(f"{rx.address} uses tcp (not reachable over UCX") == 1


@pytest.fixture(autouse=True)
def _auto_log(caplog):
    caplog.set_level(logging.INFO, logger="kvwire")
    auto.forget_logged_choices()


def test_fabric_transports_are_read_from_the_ucx_resource_list():
    info = """#      resource 0  :  md 0  dev 0  flags -- self/memory
#      resource 1  :  md 1  dev 1  flags -- tcp/eth0
#      resource 2  :  md 2  dev 0  flags -- cma/memory
#      resource 3  :  md 3  dev 2  flags -a rc_mlx5/mlx5_0:1
#      resource 4  :  md 3  dev 2  flags s- ud_verbs/mlx5_0:1
#      resource 5  :  md 4  dev 3  flags -- cuda_ipc/cuda"""
    assert ucx.fabric_transports(info) == ["rc_mlx5", "ud_verbs"]
    assert {"cuda_ipc", "cma", "tcp"} <= ucx.context_transports(info)


@needs_ucxx
def test_a_ucx_that_can_open_no_gpu_does_not_take_cuda_memory():
    """UCX built with CUDA (ucxx-cu12 here) says cuda_support on a machine without a GPU
    too; only a device it can open (cuda_copy among its resources) lets CUDA memory go."""
    from kvwire.transport.ucx.hub import Hub

    hub = Hub.get(ucx.UcxOptions())
    if "cuda_copy" in ucx.context_transports(hub.context.info):
        pytest.skip("UCX opened a GPU here")
    assert hub.cuda is False


def test_kvwire_tunes_ucx_tcp_segments_unless_the_user_sets_them(monkeypatch):
    for name in ("UCX_TCP_TX_SEG_SIZE", "UCX_TCP_RX_SEG_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert ucx.tuned_defaults()["TCP_TX_SEG_SIZE"] == "64k"
    assert "TCP_TX_SEG_SIZE" not in ucx.tuned_defaults((("TCP_TX_SEG_SIZE", "8k"),))
    # a receive segment under 64k would make UCX refuse the context: leave both alone
    assert "TCP_TX_SEG_SIZE" not in ucx.tuned_defaults((("TCP_RX_SEG_SIZE", "16k"),))
    monkeypatch.setenv("UCX_TCP_RX_SEG_SIZE", "16k")
    assert "TCP_TX_SEG_SIZE" not in ucx.tuned_defaults()


def test_ucxx_s_own_rendezvous_threshold_is_not_taken_for_the_user_s(monkeypatch):
    """ucxx writes UCX_RNDV_THRESH=8192 into os.environ when imported (and so into every
    child process's): kvwire still sends control messages eagerly then, but never over a
    threshold the user set."""
    eager = str(CTRL_BYTES + 1)
    monkeypatch.setenv("UCX_RNDV_THRESH", "8192")
    monkeypatch.setenv(UCXX_WROTE, "UCX_MEMTYPE_CACHE=n,UCX_RNDV_THRESH=8192")
    assert ucx.tuned_defaults()["RNDV_THRESH"] == eager
    assert "RNDV_THRESH" not in ucx.tuned_defaults((("RNDV_THRESH", "inf"),))
    monkeypatch.setenv("UCX_RNDV_THRESH", "64k")  # changed since ucxx wrote it: the user's
    assert "RNDV_THRESH" not in ucx.tuned_defaults()
    monkeypatch.setenv("UCX_RNDV_THRESH", "8192")
    monkeypatch.delenv(UCXX_WROTE)  # set by the user, even if to ucxx's value
    assert "RNDV_THRESH" not in ucx.tuned_defaults()


@needs_ucxx
def test_a_child_process_sends_control_messages_eagerly_too():
    # This process has imported ucxx, so its UCX_RNDV_THRESH=8192 is in the child's environment.
    assert os.environ.get("UCX_RNDV_THRESH") == "8192" and UCXX_WROTE in os.environ
    code = ("from kvwire.transport.ucx.hub import Hub; from kvwire.transport import ucx; "
            "h = Hub.get(ucx.UcxOptions()); print(h.context.config['RNDV_THRESH'], bool(h.fabrics or h.cuda))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT,
                          check=True)
    threshold, beyond_host = done.stdout.split()
    # where UCX has RDMA or a GPU, kvwire leaves the threshold alone (ucxx's, from the environment)
    eager = "8192" if beyond_host == "True" else str(CTRL_BYTES + 1)
    assert threshold == f"intra:{eager},inter:{eager}"


@needs_ucxx
def test_ucx_starts_even_where_it_refuses_kvwire_s_defaults():
    # e.g. a site's ucx.conf with a TCP receive segment under kvwire's send segment
    env = {k: v for k, v in os.environ.items() if not k.startswith("UCX_TCP_")}
    done = subprocess.run([sys.executable, "-m", "tests.programs.ucx_refused_defaults"], capture_output=True,
                          text=True, timeout=60, env=env, cwd=ROOT, check=False)
    assert done.stdout.strip() == "started", done.stderr[-2000:]
