"""CUDA tensors over UCX without host staging, checked on the GPU: the device code paths.

There is no GPU here: under numba's CUDA simulator a HostCudaArray is host memory that
says it is CUDA memory, so kvwire takes its device paths (the blocksum kernel runs in the
simulator, UCX moves the bytes from their address). perf/gpu_check.sh runs the same
paths with real CUDA tensors on a GPU machine.
"""

import threading

import ml_dtypes
import numpy as np
import pytest

import kvwire.layer_bytes
from kvwire import IntegrityError, KVLayout, Receiver, RequestRejected, Sender, TensorSpec, device
from kvwire.testing.hostcuda import HostCudaArray, host_cuda

from .support import assert_same_bytes, random_kv, ucx_missing, wait_until

if not device.simulated():
    pytest.skip("these tests pose host memory as CUDA memory (NUMBA_ENABLE_CUDASIM=1)", allow_module_level=True)

SECRET = b"device"
TOKENS = 16


@pytest.fixture
def layout():
    # Small on purpose: the simulated kernel takes ~0.5 s per 4 KiB block.
    return KVLayout(
        [
            {"state": TensorSpec((8, 8), "float32")},
            {"latent": TensorSpec((1, 64), "bfloat16", per_token=True)},
        ]
    )


@pytest.fixture
def gpu_checksums(monkeypatch):
    """Counts the frames checksummed by the GPU kernel (it still computes them)."""
    calls = []
    real = device.frame_blocksum

    def counted(rid, layer, chunk, payload):
        calls.append((layer, chunk))
        return real(rid, layer, chunk, payload, kernel=True)  # the simulated kernel itself

    monkeypatch.setattr(device, "frame_blocksum", counted)
    return calls


def need_ucx():
    if why := ucx_missing():
        pytest.skip(f"ucx backend: {why}")


def on_device(kv):
    return [{name: host_cuda(array) for name, array in tensors.items()} for tensors in kv]


def send(tx, request_id, kv):
    xfer = tx.open(request_id, TOKENS)
    for i, tensors in enumerate(kv):
        xfer.send_layer(i, tensors)
    return xfer.finish(timeout=60)


@pytest.fixture
def device_allocations(monkeypatch):
    """Counts new device arrays (a receiver's landing buffer, a sender's joined chunk)."""
    sizes = []
    real = device.empty

    def counted(nbytes):
        sizes.append(nbytes)
        return real(nbytes)

    monkeypatch.setattr(device, "empty", counted)
    return sizes


def test_cuda_tensors_go_over_ucx_as_they_are_into_cuda_buffers(layout, gpu_checksums, device_allocations):
    need_ucx()
    kv = random_kv(layout, TOKENS, seed=1)
    targets = [
        {"state": host_cuda(np.zeros((8, 8), np.float32))},
        {"latent": host_cuda(np.zeros((TOKENS + 4, 1, 64), ml_dtypes.bfloat16))},
    ]
    with Receiver(layout, "127.0.0.1:0", backend="ucx", secret=SECRET) as rx:
        rx.expect("gpu", targets)
        with Sender(layout, rx.address, backend="ucx", streams=1, secret=SECRET) as tx:
            assert tx.takes_device_memory
            send(tx, "gpu", on_device(kv))
        with rx.wait("gpu", timeout=30) as got:
            got.wait_done(timeout=30)
            assert got.layer(1)["latent"] is not None
            assert isinstance(got.layer(1)["latent"], HostCudaArray)  # the engine's own buffer, first T rows
            assert got.layer(1)["latent"].shape == (TOKENS, 1, 64)
        assert targets[0]["state"].tobytes() == kv[0]["state"].tobytes()
        assert targets[1]["latent"][:TOKENS].tobytes() == kv[1]["latent"].tobytes()
        assert not targets[1]["latent"][TOKENS:].view(np.uint16).any()  # rows past T untouched
        wait_until(lambda: rx.bytes_in_use == 0)
    # each frame checked on the device by the sender, and again by the receiver
    assert sorted(gpu_checksums) == [(0, 0), (0, 0), (1, 0), (1, 0)]
    assert device_allocations == []  # each chunk went from one CUDA tensor straight into one CUDA buffer


def test_a_layer_of_many_chunks_lands_in_one_cuda_buffer_each_chunk_checked_while_the_next_arrives(monkeypatch):
    need_ucx()
    checked, threads = [], {}
    real = device.frame_blocksum

    def counted(rid, layer, chunk, payload):  # (the CPU definition: the simulated kernel would take minutes)
        checked.append((layer, chunk))
        threads.setdefault(threading.current_thread().name, []).append(chunk)
        return real(rid, layer, chunk, payload)

    monkeypatch.setattr(device, "frame_blocksum", counted)
    big = KVLayout([{"k": TensorSpec((8, 128), "bfloat16", per_token=True)}])
    tokens = 1536  # 3 MiB: three 1 MiB chunks, the first two checked by the verifier thread
    kv = random_kv(big, tokens, seed=6)
    target = host_cuda(np.zeros((tokens, 8, 128), ml_dtypes.bfloat16))
    with Receiver(big, "127.0.0.1:0", backend="ucx", secret=SECRET) as rx:
        rx.expect("chunks", [{"k": target}])
        with Sender(big, rx.address, backend="ucx", streams=1, secret=SECRET, chunk_bytes=1 << 20) as tx:
            xfer = tx.open("chunks", tokens)
            xfer.send_layer(0, on_device(kv)[0])
            xfer.finish(timeout=60)
        with rx.wait("chunks", timeout=30) as got:
            got.wait_done(timeout=30)
        assert target.tobytes() == kv[0]["k"].tobytes()
    assert sorted(checked) == sorted([(0, 0), (0, 1), (0, 2)] * 2)  # by the sender, and in place by the receiver
    verifier = [chunks for name, chunks in threads.items() if name.startswith("kvwire-rx-verify")]
    # (the last chunk goes to the verifier too if it lags behind, else the reader checks it)
    assert len(verifier) == 1 and verifier[0][:2] == [0, 1]


def test_a_chunk_that_fails_its_check_in_a_cuda_buffer_fails_the_request(layout, monkeypatch):
    # Received in place, as host bytes are: the request fails at both ends and is never
    # handed to the engine (the buffer's content is undefined, as for host buffers).
    need_ucx()
    data = kvwire.layer_bytes.Data

    def announced_wrong(rid, layer, chunk, nbytes, checksum, algorithm):  # the fault: a bad checksum
        return data(rid, layer, chunk, nbytes, checksum ^ (layer == 1), algorithm)

    monkeypatch.setattr(kvwire.layer_bytes, "Data", announced_wrong)
    kv = random_kv(layout, TOKENS, seed=5)
    targets = [
        {"state": host_cuda(np.zeros((8, 8), np.float32))},
        {"latent": host_cuda(np.zeros((TOKENS, 1, 64), ml_dtypes.bfloat16))},
    ]
    with Receiver(layout, "127.0.0.1:0", backend="ucx", secret=SECRET) as rx:
        rx.expect("bad", targets)
        with Sender(layout, rx.address, backend="ucx", streams=1, secret=SECRET) as tx:
            with pytest.raises(IntegrityError, match="request 'bad' layer 1 chunk 0: checksum mismatch"):
                send(tx, "bad", on_device(kv))
        with pytest.raises(IntegrityError, match="request 'bad' layer 1 chunk 0: checksum mismatch"):
            rx.wait("bad", timeout=30)
        wait_until(lambda: rx.bytes_in_use == 0)


def test_cuda_tensors_into_receiver_memory_are_checked_on_host(layout, gpu_checksums):
    need_ucx()
    kv = random_kv(layout, TOKENS, seed=2)
    with Receiver(layout, "127.0.0.1:0", backend="ucx", secret=SECRET) as rx:
        with Sender(layout, rx.address, backend="ucx", streams=1, secret=SECRET) as tx:
            send(tx, "to-host", on_device(kv))
        with rx.wait("to-host", timeout=30) as got:
            for i, tensors in enumerate(kv):
                assert_same_bytes(got.layer(i, timeout=30), tensors)
    assert sorted(gpu_checksums) == [(0, 0), (1, 0)]  # the sender's; the receiver used the CPU path


@pytest.mark.parametrize("backend", ["tcp", "ucx"])
def test_host_tensors_into_cuda_buffers(layout, backend, gpu_checksums):
    if backend == "ucx":
        need_ucx()
    kv = random_kv(layout, TOKENS, seed=3)
    targets = [{"state": host_cuda(np.zeros((8, 8), np.float32))}, {}]
    with Receiver(layout, "127.0.0.1:0", backend=backend, secret=SECRET) as rx:
        rx.expect("h2d", targets)
        with Sender(layout, rx.address, backend=backend, streams=1, secret=SECRET) as tx:
            send(tx, "h2d", kv)
        with rx.wait("h2d", timeout=30) as got:
            got.wait_done(timeout=30)
            assert_same_bytes(got.layer(1), kv[1])
        assert targets[0]["state"].tobytes() == kv[0]["state"].tobytes()
    assert gpu_checksums == []  # xxh3 frames: the device copy is checked on host


def test_cuda_tensors_over_tcp_are_staged_to_host(layout, gpu_checksums):
    kv = random_kv(layout, TOKENS, seed=4)
    with Receiver(layout, "127.0.0.1:0", backend="tcp", secret=SECRET) as rx:
        with Sender(layout, rx.address, backend="tcp", streams=1, secret=SECRET) as tx:
            assert not tx.takes_device_memory
            send(tx, "staged", on_device(kv))
        with rx.wait("staged", timeout=30) as got:
            for i, tensors in enumerate(kv):
                assert_same_bytes(got.layer(i, timeout=30), tensors)
    assert gpu_checksums == []


def test_an_unpaged_cuda_buffer_for_a_lossy_codec_or_a_non_contiguous_one_is_refused(layout):
    lossy = KVLayout([{"k": TensorSpec((2, 64), "bfloat16", per_token=True)}])
    with Receiver(lossy, "127.0.0.1:0", secret=SECRET) as rx:
        rx.expect("int8", [{"k": host_cuda(np.zeros((TOKENS, 2, 64), ml_dtypes.bfloat16))}])
        with Sender(lossy, rx.address, streams=1, secret=SECRET) as tx:
            kv = {"k": np.random.default_rng(5).normal(size=(TOKENS, 2, 64)).astype(ml_dtypes.bfloat16)}
            xfer = tx.open("int8", TOKENS, codec="int8")
            with pytest.raises(
                RequestRejected, match="a CUDA buffer takes a lossless tensor, or with block_ids a paged pool"
            ):
                xfer.send_layer(0, kv)  # raises here if the refusal is back already
                xfer.finish(timeout=10)
    with Receiver(layout, "127.0.0.1:0", secret=SECRET) as rx:
        strided = host_cuda(np.zeros((8, 16), np.float32))[:, ::2]
        rx.expect("strided", [{"state": strided}, {}])
        with (
            Sender(layout, rx.address, streams=1, secret=SECRET) as tx,
            pytest.raises(RequestRejected, match="tensor 'state': CUDA array must be C-contiguous"),
        ):
            send(tx, "strided", random_kv(layout, TOKENS))


# -- paged CUDA pools: gathered (and quantized) by kernels on the sender, scattered by kernels on the receiver


@pytest.fixture
def paged_layout():
    return KVLayout([{"k": TensorSpec((2, 64), "bfloat16", per_token=True)}])


def pool_with(tokens, block_ids, block_size=4, num_blocks=8, seed=6):
    """A host pool holding ``tokens`` (finite bf16) in ``block_ids``, the rest random."""
    rng = np.random.default_rng(seed)
    pool = rng.normal(size=(num_blocks, block_size, 2, 64)).astype(ml_dtypes.bfloat16)
    rows = pool.reshape(num_blocks * block_size, 2, 64)
    for t in range(len(tokens)):
        rows[block_ids[t // block_size] * block_size + t % block_size] = tokens[t]
    return pool


def receive_paged(layout, backend, pool, codec, *, target=None, target_ids=None):
    """Send TOKENS tokens of ``pool`` (blocks 5, 2, 7, 0) with ``codec``; the received layer."""
    with Receiver(layout, "127.0.0.1:0", backend=backend, secret=SECRET) as rx:
        if target is not None:
            rx.expect("paged", [{"k": target}], block_ids=target_ids)
        with Sender(layout, rx.address, backend=backend, streams=1, secret=SECRET) as tx:
            xfer = tx.open("paged", TOKENS, codec=codec)
            xfer.send_layer(0, {"k": pool}, block_ids=[5, 2, 7, 0])
            xfer.finish(timeout=60)
        with rx.wait("paged", timeout=60) as got:
            return {k: np.array(v) for k, v in got.layer(0, timeout=60).items()}


@pytest.mark.parametrize("codec", ["none", "int8"])
def test_a_paged_cuda_pool_is_gathered_on_the_device_and_sent_from_it(paged_layout, codec, gpu_checksums):
    need_ucx()
    tokens = np.random.default_rng(7).normal(size=(TOKENS, 2, 64)).astype(ml_dtypes.bfloat16)
    pool = pool_with(tokens, [5, 2, 7, 0])
    reference = receive_paged(paged_layout, "tcp", pool, codec)  # host pool: the CPU path
    assert gpu_checksums == []
    got = receive_paged(paged_layout, "ucx", host_cuda(pool), codec)
    assert got["k"].tobytes() == reference["k"].tobytes()
    if codec == "none":
        assert got["k"].tobytes() == tokens.tobytes()
    assert gpu_checksums == [(0, 0)]  # the device frame, checked by the sender's kernel


@pytest.mark.parametrize("codec", ["none", "int8"])
@pytest.mark.parametrize("backend", ["tcp", "ucx"])
def test_a_paged_cuda_pool_receives_into_its_blocks_by_kernel(paged_layout, backend, codec):
    if backend == "ucx":
        need_ucx()
    tokens = np.random.default_rng(8).normal(size=(TOKENS, 2, 64)).astype(ml_dtypes.bfloat16)
    pool = pool_with(tokens, [5, 2, 7, 0])
    host_target = np.zeros((8, 4, 2, 64), ml_dtypes.bfloat16)
    receive_paged(paged_layout, backend, pool, codec, target=host_target, target_ids=[1, 6, 3, 4])
    device_target = host_cuda(np.zeros((8, 4, 2, 64), ml_dtypes.bfloat16))
    got = receive_paged(paged_layout, backend, pool, codec, target=device_target, target_ids=[1, 6, 3, 4])
    assert device_target.tobytes() == host_target.tobytes()  # the kernels wrote what the CPU path writes
    assert not device_target[[0, 2, 5, 7]].view(np.uint16).any()  # blocks not named stay untouched
    if codec == "none":
        assert device_target.reshape(32, 2, 64)[[4 + 0, 24 + 0]].tobytes() == tokens[[0, 4]].tobytes()
    assert np.array(got["k"]).shape == (8, 4, 2, 64)  # layer() hands back the engine's pool
