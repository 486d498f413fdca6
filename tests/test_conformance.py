"""One behaviour for every backend: the same API, bytes, errors and failure times over each.

Each test runs once per backend. A backend that cannot run here (ucxx not installed) is
skipped with the reason; on a GPU machine, ``KVWIRE_TEST_DEVICE=cuda`` sends CUDA tensors
(and receives into CUDA buffers where a test gives buffers); ``KVWIRE_TEST_DEVICE=sim``
does the same with host memory posing as CUDA memory under numba's simulator
(kvwire.testing.hostcuda), which takes kvwire's device paths on a machine without a GPU.
"""

import gc
import os
import threading
import time
import weakref

import ml_dtypes
import numpy as np
import pytest
import torch

from kvwire import (
    AuthenticationError,
    KVLayout,
    LayoutMismatchError,
    PeerLostError,
    Receiver,
    Sender,
    TensorSpec,
    TransferTimeout,
    device,
)
from kvwire.testing.hostcuda import host_cuda

from .support import (
    assert_same_bytes,
    hybrid_layout,
    kill,
    random_kv,
    run_program,
    still_serves,
    ucx_missing,
    wait_until,
)

SECRET = b"conformance"
BACKENDS = ["tcp", "ucx"]
DEVICE = os.environ.get("KVWIRE_TEST_DEVICE", "cpu")
if DEVICE == "sim" and not device.simulated():
    pytest.skip("KVWIRE_TEST_DEVICE=sim needs NUMBA_ENABLE_CUDASIM=1", allow_module_level=True)


@pytest.fixture(params=BACKENDS)
def backend(request):
    if request.param == "ucx" and (why := ucx_missing()):
        pytest.skip(f"ucx backend: {why}")
    return request.param


@pytest.fixture
def layout():
    return hybrid_layout()


@pytest.fixture
def receiver(layout, backend):
    rx = Receiver(layout, "127.0.0.1:0", backend=backend, secret=SECRET)
    yield rx
    rx.close()


@pytest.fixture
def sender(layout, receiver, backend):
    tx = Sender(layout, receiver.address, backend=backend, streams=3, secret=SECRET)
    yield tx
    tx.close()


def on_device(kv):
    """The layers' tensors on the test device (numpy stays numpy on the CPU)."""
    if DEVICE == "cpu":
        return kv
    if DEVICE == "sim":
        return [{n: host_cuda(a) for n, a in t.items()} for t in kv]
    return [{n: _torch_copy(a).to(DEVICE) for n, a in t.items()} for t in kv]


def _torch_copy(array: np.ndarray) -> torch.Tensor:
    """A torch CPU tensor with ``array``'s bits (empty arrays too, which torch cannot view)."""
    tensor = torch.empty(array.shape, dtype=_torch_dtype(array.dtype))
    tensor.view(torch.uint8).numpy()[...] = array.view(np.uint8)
    return tensor


def tensor_on_device(tensor):
    """A torch CPU tensor on the test device (in the simulator: a HostCudaArray of its bits)."""
    if DEVICE == "cpu":
        return tensor
    if DEVICE == "sim":
        dtype = _numpy_dtype(tensor.dtype)
        bits = tensor.contiguous().view(torch.uint8).numpy()
        return host_cuda(bits.view(dtype).reshape(tuple(tensor.shape)))
    return tensor.to(DEVICE)


def on_host(tensors):
    """numpy copies of a layer's tensors (torch CUDA tensors come back to host)."""
    if DEVICE == "cpu":
        return tensors
    if DEVICE == "sim":
        return {n: np.asarray(t).view(np.ndarray) for n, t in tensors.items()}
    return {
        n: np.frombuffer(t.contiguous().view(torch.uint8).cpu().numpy().tobytes(), dtype=_numpy_dtype(t.dtype)).reshape(
            tuple(t.shape)
        )
        for n, t in tensors.items()
    }


def _numpy_dtype(dtype):
    return {
        torch.bfloat16: ml_dtypes.bfloat16,
        torch.float32: np.dtype("float32"),
        torch.float16: np.dtype("float16"),
        torch.int8: np.dtype("int8"),
        torch.uint8: np.dtype("uint8"),
        torch.float8_e4m3fn: ml_dtypes.float8_e4m3fn,
    }[dtype]


def _torch_dtype(dtype):
    if dtype == ml_dtypes.bfloat16:
        return torch.bfloat16
    return {
        np.dtype("float32"): torch.float32,
        np.dtype("float16"): torch.float16,
        np.dtype("int8"): torch.int8,
        np.dtype("uint8"): torch.uint8,
    }[np.dtype(dtype)]


def send_all(tx, request_id, kv, num_tokens, **open_args):
    """Send ``kv`` (host arrays) from the test device's memory."""
    xfer = tx.open(request_id, num_tokens, **open_args)
    for i, tensors in enumerate(on_device(kv)):
        xfer.send_layer(i, tensors)
    return xfer.finish(timeout=30)


# -- bytes --------------------------------------------------------------------------------


@pytest.mark.parametrize("num_tokens", [0, 1, 300, 5000])
def test_round_trip_is_bit_exact(layout, receiver, sender, num_tokens):
    kv = random_kv(layout, num_tokens, seed=num_tokens)
    stats = send_all(sender, f"rt{num_tokens}", kv, num_tokens)
    with receiver.wait(f"rt{num_tokens}", timeout=10) as got:
        assert got.num_tokens == num_tokens
        for i, tensors in enumerate(kv):
            assert_same_bytes(got.layer(i, timeout=10), tensors)
        assert got.layer(3)["latent"].dtype == ml_dtypes.bfloat16
        assert got.layer(3)["latent"].shape == (num_tokens, 1, 64)
    assert stats.raw_bytes == layout.nbytes(num_tokens)
    wait_until(lambda: receiver.bytes_in_use == 0)


def test_many_chunks_verified_while_the_next_arrive_round_trip(layout, receiver, backend):
    """Chunks of 1 MiB and more are checked while the next one is received (a second
    thread): every byte still lands, in order, and each layer is acked once."""
    kv = random_kv(layout, 40_000, seed=11)  # the MLA layer: ~5 MiB, five 1 MiB chunks
    with Sender(layout, receiver.address, backend=backend, streams=2, secret=SECRET, chunk_bytes=1 << 20) as tx:
        for round_ in range(2):
            send_all(tx, f"chunks{round_}", kv, 40_000)
            with receiver.wait(f"chunks{round_}", timeout=10) as got:
                for i, tensors in enumerate(kv):
                    assert_same_bytes(got.layer(i, timeout=10), tensors)
    wait_until(lambda: receiver.bytes_in_use == 0)


def test_torch_bfloat16_with_nan_and_many_small_tensors_round_trip(backend):
    layout = KVLayout(
        [
            {"k": TensorSpec((2, 8), "bfloat16", per_token=True), "q8": TensorSpec((5, 3), "float8_e4m3fn")},
            {f"b{j}": TensorSpec((256,), "float32") for j in range(64)},  # received whole, then scattered
        ]
    )
    k = torch.randn(33, 2, 8).to(torch.bfloat16)
    k[0, 0, 0] = float("nan")
    q8 = torch.randn(5, 3).to(torch.float8_e4m3fn)
    blocks = {f"b{j}": torch.randn(256) for j in range(64)}
    with Receiver(layout, backend=backend) as rx, Sender(layout, rx.address, backend=backend, streams=2) as tx:
        xfer = tx.open("t", 33)
        xfer.send_layer(0, {"k": tensor_on_device(k), "q8": tensor_on_device(q8)})
        xfer.send_layer(1, {n: tensor_on_device(t) for n, t in blocks.items()})
        xfer.finish(timeout=10)
        with rx.wait("t", timeout=10) as got:
            layer0, layer1 = got.layer(0, timeout=10), got.layer(1, timeout=10)
            assert torch.equal(torch.from_numpy(layer0["k"].view(np.uint16)), k.view(torch.uint16))
            assert torch.equal(torch.from_numpy(layer0["q8"].view(np.uint8)), q8.view(torch.uint8))
            for name, tensor in blocks.items():
                assert torch.equal(torch.from_numpy(layer1[name]), tensor)


def test_receiving_into_engine_buffers(layout, receiver, sender):
    kv = random_kv(layout, 200, seed=5)
    targets = on_device([{n: np.zeros_like(a) for n, a in t.items()} for t in kv])  # CUDA buffers on a GPU
    receiver.expect("into", targets)
    send_all(sender, "into", kv, 200)
    with receiver.wait("into", timeout=10) as got:
        got.wait_all(timeout=10)
        for expected, target in zip(kv, targets):
            assert_same_bytes(on_host(target), expected)


def test_nothing_holds_the_engines_arrays_once_a_request_is_done(layout, receiver, backend):
    """Arrays are borrowed until finish() (sender) and release (receiver), not longer: an
    engine's tensors are freed when it drops them, not when the next request comes by
    (an idle I/O or verifier thread kept the last request's arrays, and the Transfer its
    layers). Chunks of 1 MiB take the verifier thread too."""
    kv = random_kv(layout, 40_000, seed=3)
    with Sender(layout, receiver.address, backend=backend, streams=2, secret=SECRET, chunk_bytes=1 << 20) as tx:
        sent = on_device([{n: a.copy() for n, a in t.items()} for t in kv])  # arrays only the test holds
        targets = on_device([{n: np.zeros_like(a) for n, a in t.items()} for t in kv])
        receiver.expect("borrowed", targets)
        xfer = tx.open("borrowed", 40_000)
        for i, tensors in enumerate(sent):
            xfer.send_layer(i, tensors)
        xfer.finish(timeout=30)
        with receiver.wait("borrowed", timeout=10) as got:
            got.wait_all(timeout=10)
        assert_same_bytes(on_host(targets[3]), kv[3])
        refs = [weakref.ref(a) for layer in sent + targets for a in layer.values()]
        del sent, targets, got, tensors
        wait_until(lambda: gc.collect() is not None and not [r for r in refs if r() is not None])
        assert xfer.stats.layers == len(kv)  # the Transfer lives on; its arrays did not


# -- streaming and concurrency -------------------------------------------------------------


def test_a_layer_is_usable_before_the_request_finishes(layout, receiver, sender):
    kv = random_kv(layout, 64)
    xfer = sender.open("early", 64)
    xfer.send_layer(0, on_device(kv)[0])
    got = receiver.wait("early", timeout=10)
    assert_same_bytes(got.wait_layer(0, timeout=10), kv[0])
    assert not got.is_ready(1) and not got.done
    for i in range(1, len(kv)):
        xfer.send_layer(i, on_device(kv)[i])
    xfer.finish(timeout=10)
    assert xfer.layer_sent(len(kv) - 1)
    got.wait_done(timeout=10)
    assert got.done
    got.release()


def test_concurrent_requests_share_the_connections(layout, receiver, sender, backend):
    kvs = {f"c{i}": (random_kv(layout, 100 + 50 * i, seed=i), 100 + 50 * i) for i in range(8)}
    errors = []

    def run(rid):
        try:
            send_all(sender, rid, *kvs[rid])
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(rid,)) for rid in kvs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    for rid, (kv, num_tokens) in kvs.items():
        with receiver.wait(rid, timeout=10) as got:
            assert got.num_tokens == num_tokens
            for i, tensors in enumerate(kv):
                assert_same_bytes(got.layer(i), tensors)
    m = sender.metrics()
    assert m.requests_completed == 8 and m.requests_failed == 0
    assert m.bytes == sum(layout.wire_bytes(n) for _, n in kvs.values())
    assert m.goodput_bps > 0
    if backend == "tcp":  # TCP_INFO of each connection (UCX has no such signals)
        assert len(m.links) == 3 and all(link.rtt_ms > 0 for link in m.links)


# -- refusals ------------------------------------------------------------------------------


def test_wrong_layout_is_refused_naming_layer_and_tensor(backend, receiver, caplog):
    with pytest.raises(LayoutMismatchError) as info:
        Sender(hybrid_layout(state_dim=16), receiver.address, backend=backend, secret=SECRET)
    assert str(info.value) == (
        "KV layout mismatch: layer 0 tensor 'conv': receiver has float32[128, 4], sender has float32[64, 4]"
    )
    wait_until(lambda: "LayoutMismatchError" in caplog.text, what="the receiver's log of the refusal")
    assert "refused connection from 127.0.0.1:" in caplog.text
    still_serves(receiver, hybrid_layout(), SECRET, backend=backend)


@pytest.mark.parametrize("secret", [b"wrong", None], ids=["wrong", "missing"])
def test_wrong_secret_is_refused(backend, layout, receiver, secret, caplog):
    with pytest.raises(AuthenticationError):
        Sender(layout, receiver.address, backend=backend, secret=secret)
    wait_until(lambda: "AuthenticationError" in caplog.text, what="the receiver's log of the refusal")
    assert "refused connection from 127.0.0.1:" in caplog.text
    still_serves(receiver, layout, SECRET, backend=backend)


def test_a_missed_deadline_is_transfer_timeout_on_both_sides(layout, receiver, sender):
    kv = random_kv(layout, 64)
    xfer = sender.open("late", 64, timeout=0.5)
    xfer.send_layer(0, on_device(kv)[0])  # the other layers never come
    got = receiver.wait("late", timeout=5)
    start = time.monotonic()
    with pytest.raises(TransferTimeout, match=r"request 'late' from .* missed its deadline \(1/4 layers arrived\)"):
        got.wait_layer(3, timeout=5)
    assert time.monotonic() - start < 2
    wait_until(lambda: xfer.error is not None, timeout=5, what="the receiver's abort reaching the sender")
    assert time.monotonic() - start < 2
    with pytest.raises(TransferTimeout, match="missed its deadline"):
        xfer.finish()
    wait_until(lambda: receiver.bytes_in_use == 0, what="receiver memory freed")
    send_all(sender, "next", kv, 64)  # the connections keep serving


# -- dead peers (real processes, SIGKILL) ---------------------------------------------------

def test_a_killed_sender_fails_the_receiver_fast(layout, receiver, backend):
    proc = run_program("held_sender", receiver.address, backend, SECRET.decode(), "victim")
    try:
        assert proc.stdout.readline().strip() == "sent", proc.stderr.read()
        got = receiver.wait("victim", timeout=10)
        got.wait_layer(0, timeout=10)
        kill(proc)
        start = time.monotonic()
        with pytest.raises(
            PeerLostError,
            match=r"request 'victim': connection from .* lost with 1/4 layers arrived .*no reconnect within 2.0s",
        ):
            got.wait_layer(3, timeout=10)
        assert time.monotonic() - start < 4  # the resume grace (2 s), then at once
    finally:
        kill(proc)
    wait_until(lambda: receiver.bytes_in_use == 0, what="receiver memory freed")
    with pytest.raises(PeerLostError):
        receiver.wait("victim", timeout=1)
    still_serves(receiver, layout, SECRET, request_id="victim", backend=backend)  # the id can be reused


def test_a_killed_receiver_fails_the_sender_fast(layout, backend):
    proc = run_program("held_receiver", backend, SECRET.decode())
    try:
        address = proc.stdout.readline().strip()
        assert address, proc.stderr.read()
        with Sender(layout, address, backend=backend, secret=SECRET, streams=2) as tx:
            xfer = tx.open("lost", 64)
            xfer.send_layer(0, random_kv(layout, 64)[0])
            wait_until(lambda: xfer.layer_sent(0), what="layer 0 sent")
            kill(proc)
            start = time.monotonic()
            wait_until(lambda: xfer.error is not None, what="the sender noticing its receiver died")
            assert time.monotonic() - start < 2
            with pytest.raises(PeerLostError, match="request 'lost': connection \\d to .* lost"):
                xfer.finish(timeout=10)
    finally:
        kill(proc)
