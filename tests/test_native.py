"""Layers of many small tensors: kvwire.native's compiled loops and their Python twins give
the same bytes (and digests), and such layers land exactly in the engine's ``expect()``
buffers over real sockets, whichever twin runs and whichever path (C-speed or general, joined
or written as they are) a layer takes."""

import dataclasses
import errno
import socket
import threading

import ml_dtypes
import numpy as np
import pytest
import xxhash

from kvwire import KVLayout, Receiver, RequestRejected, Sender, TensorSpec, native, uniform
from kvwire.buffers import ReusedBuffers
from kvwire.transport import tcp

from .support import assert_same_bytes, random_kv

TWINS = [pytest.param(native.scatter, native.gather, id="compiled"),
         pytest.param(native.scatter_python, native.gather_python, id="python")]


def random_destinations(rng, count):
    dtypes = [np.uint8, np.float16, np.float32, np.int64]
    return [np.zeros(tuple(rng.integers(1, 5, size=rng.integers(1, 4))), dtype=dtypes[rng.integers(4)])
            for _ in range(count)]


@pytest.mark.parametrize(("scatter", "gather"), TWINS)
def test_scatter_and_gather_move_every_byte_in_order(scatter, gather):
    rng = np.random.default_rng(7)
    sources = random_destinations(rng, 200)
    for array in sources:
        array.view(np.uint8)[...] = rng.integers(0, 256, array.nbytes, dtype=np.uint8).reshape(array.view(np.uint8).shape)
    joined = np.empty(sum(a.nbytes for a in sources), dtype=np.uint8)
    assert gather(sources, [a.dtype for a in sources], [a.shape for a in sources], joined)
    assert joined.tobytes() == b"".join(a.tobytes() for a in sources)
    copies = [np.zeros_like(a) for a in sources]
    assert scatter(joined, copies) == joined.nbytes
    assert all(c.tobytes() == a.tobytes() for c, a in zip(copies, sources))


@pytest.mark.parametrize(("scatter", "gather"), TWINS)
def test_gather_declines_what_is_not_exactly_as_planned(scatter, gather):
    good = np.zeros((4, 8), np.float32)
    out = np.empty(256, np.uint8)
    f32, f16 = np.dtype(np.float32), np.dtype(np.float16)
    assert gather([good], [f32], [(4, 8)], out)
    assert not gather([good], [f16], [(4, 8)], out)  # another dtype
    assert not gather([good], [np.dtype(">f4")], [(4, 8)], out)  # another byte order
    assert not gather([good], [f32], [(8, 4)], out)  # another shape
    assert not gather([good[:, ::2]], [f32], [(4, 4)], out)  # not contiguous
    assert not gather([[1.0] * 32], [f32], [(4, 8)], out)  # not a numpy array
    assert not gather([memoryview(good)], [f32], [(4, 8)], out)  # (another buffer: the general path)
    assert not gather([good, good], [f32, f32], [(4, 8), (4, 8)], out[:200])  # does not fit
    with pytest.raises(TypeError, match="not a numpy dtype"):
        gather([good], ["f"], [(4, 8)], out)


@pytest.mark.parametrize(("scatter", "gather"), TWINS)
def test_gather_without_a_destination_only_checks(scatter, gather):
    good = np.zeros((4, 8), np.float32)
    f32 = np.dtype(np.float32)
    assert gather([good, good], [f32, f32], [(4, 8), (4, 8)], None)
    assert not gather([good, good[:, ::2]], [f32, f32], [(4, 8), (4, 4)], None)
    assert not gather([good], [np.dtype(np.int32)], [(4, 8)], None)


def random_pieces(rng):
    """Pieces of a frame as a writer gets them: numpy arrays of several dtypes, bytes, views."""
    arrays = random_destinations(rng, 1500)  # more than one sendmsg takes (1,024 buffers)
    for array in arrays:
        array.view(np.uint8)[...] = rng.integers(0, 256, array.view(np.uint8).shape, dtype=np.uint8)
    return [b"header", *arrays, b"", memoryview(bytes(range(256)))[7:200], bytearray(rng.bytes(300_000)),
            np.zeros(0, np.float32), rng.integers(0, 9, (64, 1024), dtype=np.int64)]


def joined(pieces) -> bytes:
    return b"".join(p.tobytes() if isinstance(p, np.ndarray) else bytes(p) for p in pieces)


@pytest.mark.parametrize("xxh3_pieces", [pytest.param(native.xxh3_pieces, id="compiled"),
                                         pytest.param(native.xxh3_pieces_python, id="python")])
def test_the_digest_of_pieces_is_xxh3_of_their_bytes_joined(xxh3_pieces):
    pieces = random_pieces(np.random.default_rng(4))
    whole = joined(pieces)
    for seed in (0, 1, 2**64 - 1):
        assert xxh3_pieces(seed, pieces) == xxhash.xxh3_64_intdigest(whole, seed=seed)
    assert xxh3_pieces(5, []) == xxhash.xxh3_64_intdigest(b"", seed=5)
    with pytest.raises(TypeError):
        xxh3_pieces(0, [b"ok", object()])
    with pytest.raises(BufferError):
        xxh3_pieces(0, [memoryview(np.zeros((4, 4), np.uint8)[:, ::2])])  # not contiguous


def test_the_compiled_digest_reads_arrays_of_any_dtype_as_they_are():
    assert native.XXH3_COMPILED == native.COMPILED  # found in the xxhash package's module
    if not native.XXH3_COMPILED:
        pytest.skip("kvwire._native was not built")
    bf16 = np.arange(1000, dtype=np.float32).astype(ml_dtypes.bfloat16)  # (no buffer export of its own)
    assert native.xxh3_pieces(9, [bf16]) == xxhash.xxh3_64_intdigest(bf16.view(np.uint16).tobytes(), seed=9)


needs_compiled = pytest.mark.skipif(native.send_pieces is None, reason="kvwire._native was not built")


@needs_compiled
def test_send_pieces_writes_every_byte_and_goes_on_from_where_it_stopped():
    pieces = random_pieces(np.random.default_rng(5))
    pieces.append(np.ones(8 << 20, np.uint8))  # more than the socket takes at once
    whole = joined(pieces)
    sender, receiver = socket.socketpair()
    with sender, receiver:
        index, offset = native.send_pieces(sender.fileno(), pieces, 0, 0, socket.MSG_DONTWAIT)
        assert (index, offset) < (len(pieces), 0)  # the socket's buffer is full: it stopped
        received = bytearray()
        reader = threading.Thread(target=lambda: received.extend(_read(receiver, len(whole))))
        reader.start()
        assert native.send_pieces(sender.fileno(), pieces, index, offset, 0) == (len(pieces), 0)
        reader.join(timeout=30)
        assert bytes(received) == whole


def _read(sock, nbytes):
    out = bytearray()
    while len(out) < nbytes:
        out += sock.recv(nbytes - len(out))
    return out


@needs_compiled
def test_send_pieces_reports_what_the_socket_says():
    sender, receiver = socket.socketpair()
    receiver.close()
    with sender, pytest.raises(OSError) as failed:
        native.send_pieces(sender.fileno(), [b"x"], 0, 0, 0)
    assert failed.value.errno == errno.EPIPE
    with pytest.raises(TypeError):
        native.send_pieces(0, [object()], 0, 0, 0)
    with pytest.raises(ValueError, match="out of range"):
        native.send_pieces(0, [b"x"], 2, 0, 0)


@needs_compiled
def test_a_tcp_connection_leaves_the_rest_of_a_direct_write_as_buffers_to_send():
    pieces = [b"header", *random_pieces(np.random.default_rng(6)), np.ones(8 << 20, np.uint8)]
    whole = joined(pieces)
    sender, receiver = socket.socketpair()
    conn = tcp.TcpConnection(sender, "peer")
    with sender, receiver:
        left = conn.send_now(pieces)
        assert left and sum(memoryview(p).nbytes for p in left) < len(whole)
        received = bytearray()
        reader = threading.Thread(target=lambda: received.extend(_read(receiver, len(whole))))
        reader.start()
        conn.send(left)
        reader.join(timeout=30)
        assert bytes(received) == whole


@pytest.mark.parametrize(("scatter", "gather"), TWINS)
def test_scatter_fills_numpy_arrays_and_other_buffers_alike(scatter, gather):
    source = np.arange(32, dtype=np.uint8)
    array, raw, tail = np.zeros((2, 4), np.uint16), bytearray(8), np.zeros(8, np.uint8)
    assert scatter(source, [array, raw, memoryview(tail)]) == 32
    assert array.tobytes() + bytes(raw) + tail.tobytes() == source.tobytes()
    read_only = np.zeros(4, np.uint8)
    read_only.flags.writeable = False
    with pytest.raises((TypeError, ValueError), match="read-only|not writable"):
        scatter(source, [read_only])
    assert not read_only.any()


@pytest.mark.parametrize(("scatter", "gather"), TWINS)
def test_scatter_refuses_a_short_source_naming_the_destination(scatter, gather):
    with pytest.raises(ValueError, match="scatter: destination 1 needs 8 bytes, the source has 2 left"):
        scatter(np.arange(5, dtype=np.uint8), [np.zeros(3, np.uint8), np.zeros((2, 2), np.uint16)])


def many_small_layout():
    """Four layers of 96 small fixed tensors of mixed dtypes: 0 and 2 unpadded (the C-speed
    path), 1 with a per-token tensor too, 3 with padding between tensors (the general path)."""
    kinds = [("float32", 16), ("float16", 32), ("int8", 64)]  # rows of 64 bytes: no padding
    layers = [{f"t{j:02d}": TensorSpec((j % 5 + 1, kinds[j % 3][1]), kinds[j % 3][0]) for j in range(96)}
              for _ in range(4)]
    layers[1]["kv"] = TensorSpec((2, 16), "bfloat16", per_token=True)
    layers[3] = {f"t{j:02d}": TensorSpec((j % 5 + 1, 3), kinds[j % 3][0]) for j in range(96)}
    return KVLayout(layers)


@pytest.fixture(params=["compiled", "compiled-joined", "python"])
def twins(request, monkeypatch):
    """Which loops run: compiled (TCP writes layers of many small tensors as they are, where
    the module was built), compiled but joined first (as for UCX and TLS), or the Python twins
    (no compiled module: joined, and written through Python's sendmsg)."""
    if request.param != "compiled":
        monkeypatch.setattr(tcp.TcpConnection, "capabilities",
                            dataclasses.replace(tcp.TcpConnection.capabilities, writes_many_buffers=False))
    if request.param == "python":
        monkeypatch.setattr(native, "scatter", native.scatter_python)
        monkeypatch.setattr(native, "gather", native.gather_python)
        monkeypatch.setattr(native, "xxh3_pieces", native.xxh3_pieces_python)
        monkeypatch.setattr(native, "byte_views", native.byte_views_python)
        monkeypatch.setattr(native, "send_pieces", None)


def test_many_small_tensors_land_in_their_expect_buffers(twins):
    layout, num_tokens = many_small_layout(), 12
    plans = layout.plans(num_tokens)
    assert [uniform.uniform_plan(plan) is not None for plan in plans] == [True, False, True, False]
    kv = random_kv(layout, num_tokens, seed=1)
    destinations = [{name: np.zeros_like(array) for name, array in tensors.items()} for tensors in kv]
    destinations[1]["kv"] = np.zeros((40, 2, 16), ml_dtypes.bfloat16)  # room for more tokens than sent
    sent = [dict(tensors) for tensors in kv]
    sent[2]["t07"] = np.repeat(kv[2]["t07"], 2, axis=1)[:, ::2]  # not contiguous: the general path
    with Receiver(layout, "127.0.0.1:0") as rx, Sender(layout, rx.address) as tx:
        rx.expect("r", destinations)
        xfer = tx.open("r", num_tokens)
        for i, tensors in enumerate(sent):
            xfer.send_layer(i, tensors)
        xfer.finish(timeout=30)
        with rx.wait("r", timeout=30) as got:
            for i in range(layout.num_layers):
                layer = got.layer(i)
                assert_same_bytes(layer, sent[i])
                for name, array in layer.items():
                    assert np.shares_memory(array, destinations[i][name])
    assert destinations[1]["kv"][:num_tokens].tobytes() == kv[1]["kv"].tobytes()
    assert not destinations[1]["kv"][num_tokens:].view(np.uint16).any()
    assert all(destinations[0][name].tobytes() == kv[0][name].tobytes() for name in kv[0])


def test_a_read_only_buffer_among_many_is_refused_by_name(twins):
    layout = many_small_layout()
    kv = random_kv(layout, 4, seed=2)
    destinations = [{name: np.zeros_like(array) for name, array in tensors.items()} for tensors in kv]
    destinations[0]["t03"].flags.writeable = False
    with Receiver(layout, "127.0.0.1:0") as rx, Sender(layout, rx.address) as tx:
        rx.expect("r", destinations)
        refusal = r"expect\(\) buffer for layer 0 tensor 't03': destination array must be C-contiguous and writable"
        with pytest.raises(RequestRejected, match=refusal):  # at a send_layer or at finish: the refusal may come first
            xfer = tx.open("r", 4)
            for i, tensors in enumerate(kv):
                xfer.send_layer(i, tensors)
            xfer.finish(timeout=30)
    assert not any(a.any() for tensors in destinations for a in tensors.values())  # nothing was written


def test_a_buffer_is_reused_only_once_nothing_holds_it():
    size = ReusedBuffers.MIN_BYTES
    pool = ReusedBuffers(max_bytes=2 * size)
    first, second = pool.get(size), pool.get(size)
    assert not np.shares_memory(first, second)
    address, view = first.ctypes.data, first[16:32]
    del first
    third = pool.get(size)  # a view of the first still holds it; the pool is full: a new buffer
    assert not np.shares_memory(third, view) and not np.shares_memory(third, second)
    del view
    fourth = pool.get(size)
    assert fourth.ctypes.data == address  # nothing holds the first any more: reused
    assert not any(np.shares_memory(pool.get(size), held) for held in (second, third, fourth))
    assert pool.held_bytes == 2 * size


def test_a_full_pool_lets_go_of_free_buffers_of_other_sizes():
    size = ReusedBuffers.MIN_BYTES
    pool = ReusedBuffers(max_bytes=3 * size)
    held, freed = pool.get(size), pool.get(2 * size)
    del freed
    other = 2 * size - 4096
    bigger = pool.get(other)  # room once the free buffer of another size goes; the held one stays
    assert pool.held_bytes == size + other
    again = pool.get(size)  # nothing free to let go of: allocated, not kept
    assert not np.shares_memory(again, held) and not np.shares_memory(again, bigger)
    assert pool.held_bytes == size + other
    del again, bigger
    assert pool.get(other).nbytes == other and pool.held_bytes == size + other  # reused
    small = pool.get(size // 2)  # under MIN_BYTES: never kept
    assert pool.held_bytes == size + other and small.nbytes == size // 2


def test_back_to_back_requests_of_many_small_tensors_arrive_exactly(twins):
    """The Sender joins such layers into buffers it reuses once a request is confirmed:
    each request's bytes must still be its own, one request at a time or two in flight."""
    layout = KVLayout([{f"t{j:03d}": TensorSpec((256,), "float32") for j in range(256)}] * 2)  # 256 KiB layers
    with Receiver(layout, "127.0.0.1:0") as rx, Sender(layout, rx.address) as tx:
        for first_seed in (10, 20, 30):
            sent = {}
            for seed in (first_seed, first_seed + 1):  # the second opens while the first is in flight
                kv = random_kv(layout, 0, seed=seed)
                xfer = tx.open(f"r{seed}", 0)
                for i, tensors in enumerate(kv):
                    xfer.send_layer(i, tensors)
                sent[f"r{seed}"] = (xfer, kv)
            for rid, (xfer, kv) in sent.items():
                xfer.finish(timeout=30)
                with rx.wait(rid, timeout=30) as got:
                    for i in range(layout.num_layers):
                        assert_same_bytes(got.layer(i), kv[i])


def test_a_layer_of_one_kind_is_cut_into_the_same_arrays_as_tensor_by_tensor():
    from kvwire.placement import typed

    one_kind = KVLayout([{f"t{j:02d}": TensorSpec((2, 32), "bfloat16") for j in range(12)}])
    mixed = KVLayout([{f"t{j:02d}": TensorSpec((2, 32), "bfloat16" if j % 2 else "float16") for j in range(12)}])
    padded = KVLayout([{f"t{j:02d}": TensorSpec((2, 8), "bfloat16") for j in range(12)}])  # 32 bytes each, 64 apart
    for layout, splits in ((one_kind, True), (mixed, False), (padded, False)):
        plan = layout.plans(0)[0]
        storage = np.random.default_rng(8).integers(0, 256, plan.nbytes, dtype=np.uint8)
        blocks = uniform.split(plan, storage)
        assert (blocks is not None) == splits
        if blocks is None:
            continue
        assert list(blocks) == [slot.name for slot in plan.slots]
        for slot in plan.slots:
            expected = typed(storage[slot.offset : slot.offset + slot.nbytes], slot.spec.dtype, slot.shape)
            assert blocks[slot.name].dtype == expected.dtype and blocks[slot.name].shape == expected.shape
            assert blocks[slot.name].tobytes() == expected.tobytes() and np.shares_memory(blocks[slot.name], storage)


def test_arrays_of_many_small_tensors_the_engine_keeps_stay_its_own(twins):
    """A layer of many small tensors received into the receiver's memory is cut into views
    of one buffer (kvwire.uniform.split): one kept array must keep that buffer from later
    requests, as any array does."""
    layout = KVLayout([{f"t{j:03d}": TensorSpec((256,), "float32") for j in range(256)}] * 2)  # 256 KiB layers
    kept = None
    with Receiver(layout, "127.0.0.1:0") as rx, Sender(layout, rx.address) as tx:
        for seed in range(40, 46):
            kv = random_kv(layout, 0, seed=seed)
            xfer = tx.open(f"r{seed}", 0)
            for i, tensors in enumerate(kv):
                xfer.send_layer(i, tensors)
            xfer.finish(timeout=30)
            with rx.wait(f"r{seed}", timeout=30) as got:
                layers = [got.layer(i) for i in range(layout.num_layers)]
                for i in range(layout.num_layers):
                    assert_same_bytes(layers[i], kv[i])
            if kept is None:
                kept = (layers[1]["t100"], kv[1]["t100"].copy())
            del layers
    assert kept[0].tobytes() == kept[1].tobytes()


@pytest.mark.parametrize("byte_views", [pytest.param(native.byte_views, id="compiled"),
                                        pytest.param(native.byte_views_python, id="python")])
def test_byte_views_are_flat_bytes_of_plain_writable_arrays_only(byte_views):
    arrays = [np.arange(6, dtype=np.float32).reshape(2, 3), np.ones((4,), ml_dtypes.bfloat16), np.zeros((), np.int64)]
    views = byte_views(arrays)
    assert [(v.dtype, v.shape) for v in views] == [(np.uint8, (24,)), (np.uint8, (8,)), (np.uint8, (8,))]
    assert all(np.shares_memory(v, a) and v.flags.writeable for v, a in zip(views, arrays))
    views[0][:4] = 0
    assert arrays[0][0, 0] == 0 and views[0][4:8].view(np.float32)[0] == 1.0
    read_only = np.zeros(4, np.uint8)
    read_only.flags.writeable = False
    class Sub(np.ndarray):
        pass
    for odd in (read_only, np.zeros((4, 4))[:, ::2], np.zeros(0, np.uint8), np.zeros(4).view(Sub), bytearray(4)):
        assert byte_views([arrays[0], odd]) is None
    assert byte_views([]) == []
