"""End to end over real sockets: what an engine relies on when it sends and receives KV."""

import gc
import weakref

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvwire import (
    KVLayout,
    PeerLostError,
    Receiver,
    RequestRejected,
    Sender,
    TensorSpec,
    TransferAborted,
    TransferTimeout,
)

from .support import assert_same_bytes, random_kv, run_program, send_all, wait_until


def test_the_issue_example_round_trips_exactly():
    layout = KVLayout(
        [
            {"conv": TensorSpec((768, 4), "float32"), "recurrent": TensorSpec((4, 64, 64), "float32")},
            {"latent": TensorSpec((1, 80), "bfloat16", per_token=True)},
        ]
    )
    kv = random_kv(layout, 4096, seed=7)
    with Receiver(layout, listen="127.0.0.1:0", backend="tcp", secret=b"...") as rx:
        with Sender(layout, rx.address, backend="tcp", streams=4, secret=b"...") as tx:
            xfer = tx.open("req-1", num_tokens=4096)
            xfer.send_layer(0, kv[0])
            xfer.send_layer(1, kv[1])
            stats = xfer.finish(timeout=30)
            got = rx.wait("req-1", timeout=30)
            assert got.num_tokens == 4096
            assert_same_bytes(got.wait_layer(0, timeout=30), kv[0])
            assert_same_bytes(got.layer(1), kv[1])
            assert got.layer(1)["latent"].dtype == ml_dtypes.bfloat16
    assert stats.raw_bytes == layout.nbytes(4096) == 768 * 4 * 4 + 4 * 64 * 64 * 4 + 4096 * 80 * 2
    assert stats.layers == 2 and stats.codec == "none" and stats.wire_bytes >= stats.raw_bytes


DTYPES = ["float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2", "int8", "uint8"]
tensor_specs = st.builds(
    TensorSpec,
    shape=st.lists(st.integers(0, 9), min_size=0, max_size=3).map(tuple),
    dtype=st.sampled_from(DTYPES),
    per_token=st.booleans(),
)
layouts = st.lists(
    st.dictionaries(
        st.sampled_from(["k", "v", "conv", "state", "latent", "rope"]), tensor_specs, min_size=1, max_size=4
    ),
    min_size=1,
    max_size=5,
).map(KVLayout)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    layout=layouts, num_tokens=st.sampled_from([0, 1, 2, 17, 300]), streams=st.integers(1, 3), seed=st.integers(0, 99)
)
def test_random_hybrid_layouts_round_trip_bit_exactly(layout, num_tokens, streams, seed):
    kv = random_kv(layout, num_tokens, seed)
    with Receiver(layout) as rx, Sender(layout, rx.address, streams=streams, chunk_bytes=4096) as tx:
        send_all(tx, "r", kv, num_tokens)
        with rx.wait("r", timeout=10) as got:
            for i, tensors in enumerate(kv):
                assert_same_bytes(got.layer(i, timeout=10), tensors)
        assert rx.bytes_in_use == 0


def test_torch_bfloat16_and_float8_round_trip_bit_exactly():
    layout = KVLayout(
        [{"k": TensorSpec((2, 8), "bfloat16", per_token=True), "q8": TensorSpec((5, 3), "float8_e4m3fn")}]
    )
    k = torch.randn(33, 2, 8).to(torch.bfloat16)
    k[0, 0, 0] = float("nan")
    q8 = torch.randn(5, 3).to(torch.float8_e4m3fn)
    with Receiver(layout) as rx, Sender(layout, rx.address) as tx:
        send_all(tx, "t", [{"k": k, "q8": q8}], 33)
        got = rx.wait("t", timeout=10).layer(0, timeout=10)
    assert torch.equal(torch.from_numpy(got["k"].view(np.uint16)), k.view(torch.uint16))
    assert torch.equal(torch.from_numpy(got["q8"].view(np.uint8)), q8.view(torch.uint8))


class DLPackOnly:
    """An array from some other library: all kvwire may use is the DLPack protocol."""

    def __init__(self, array):
        self._array = array

    def __dlpack__(self, **kwargs):
        return self._array.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self._array.__dlpack_device__()


def test_dlpack_inputs_are_accepted():
    layout = KVLayout([{"a": TensorSpec((3, 4), "float32", per_token=True)}])
    a = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    with Receiver(layout) as rx, Sender(layout, rx.address) as tx:
        send_all(tx, "dl", [{"a": DLPackOnly(a)}], 2)
        got = rx.wait("dl", timeout=10).layer(0)
    np.testing.assert_array_equal(got["a"], a)


def test_non_contiguous_and_buffer_protocol_inputs_are_accepted():
    layout = KVLayout([{"a": TensorSpec((4, 3), "float32"), "b": TensorSpec((6,), "uint8")}])
    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    a = base[:, ::2]  # a strided view
    b = bytearray(b"kvwire")
    with Receiver(layout) as rx, Sender(layout, rx.address) as tx:
        send_all(tx, "x", [{"a": a, "b": b}], 0)
        got = rx.wait("x", timeout=10).layer(0)
    np.testing.assert_array_equal(got["a"], a)
    assert got["b"].tobytes() == b"kvwire"


def test_expect_lands_bytes_in_the_engine_buffers(layout, receiver, sender):
    kv = random_kv(layout, 50)
    latent = np.zeros((128, 1, 64), dtype=ml_dtypes.bfloat16)  # room for more tokens than sent
    conv = torch.zeros(128, 4)
    receiver.expect("mine", {3: {"latent": latent}, 0: {"conv": conv}})
    send_all(sender, "mine", kv, 50)
    with receiver.wait("mine", timeout=10) as got:
        layer3 = got.layer(3)
        assert np.shares_memory(layer3["latent"], latent)
        assert_same_bytes(layer3, kv[3])
        assert latent[:50].tobytes() == kv[3]["latent"].tobytes()
        assert not latent[50:].view(np.uint16).any()
        assert conv.numpy().tobytes() == kv[0]["conv"].tobytes()
        assert_same_bytes(got.layer(1), kv[1])


def test_expect_buffer_too_small_fails_the_request_on_both_sides(layout, receiver, sender):
    receiver.expect("small", {3: {"latent": np.zeros((10, 1, 64), dtype=ml_dtypes.bfloat16)}})
    with pytest.raises(
        RequestRejected,
        match=r"layer 3 tensor 'latent': shape \(10, 1, 64\) cannot hold bfloat16\[T, 1, 64\] with T=50",
    ):
        send_all(sender, "small", random_kv(layout, 50), 50)
    with pytest.raises(TransferTimeout):
        receiver.wait("small", timeout=0.2)


def test_wrong_tensor_shape_dtype_or_names_are_value_errors(layout, sender):
    kv = random_kv(layout, 10)
    xfer = sender.open("bad", 10)
    with pytest.raises(
        ValueError, match=r"request 'bad' layer 0 tensor 'conv': expected float32\[128, 4\], got float32\[128, 5\]"
    ):
        xfer.send_layer(0, {**kv[0], "conv": np.zeros((128, 5), np.float32)})
    with pytest.raises(
        ValueError, match=r"layer 3 tensor 'latent': expected bfloat16\[10, 1, 64\], got float32\[10, 1, 64\]"
    ):
        xfer.send_layer(3, {**kv[3], "latent": np.zeros((10, 1, 64), np.float32)})
    with pytest.raises(
        ValueError, match=r"layer 1: missing tensors \['recurrent'\], unexpected tensors \['recurent'\]"
    ):
        xfer.send_layer(1, {"conv": kv[1]["conv"], "recurent": kv[1]["recurrent"]})
    with pytest.raises(ValueError, match="layer 9 out of range"):
        xfer.send_layer(9, kv[0])
    xfer.send_layer(0, kv[0])
    with pytest.raises(ValueError, match="layer 0 was already sent"):
        xfer.send_layer(0, kv[0])
    with pytest.raises(ValueError, match=r"finish\(\) before layers \[1, 2, 3\] were sent"):
        xfer.finish(timeout=1)
    xfer.abort()


def test_duplicate_request_id_is_refused_and_the_first_is_untouched(layout, receiver, sender):
    kv = random_kv(layout, 20)
    first = sender.open("dup", 20)
    first.send_layer(0, kv[0])
    receiver.wait("dup", timeout=10).wait_layer(0, timeout=10)
    with Sender(layout, receiver.address, secret=b"test-secret") as other:
        with pytest.raises(RequestRejected, match="request id 'dup' is already in flight on this receiver"):
            send_all(other, "dup", kv, 20)
    for i in range(1, 4):
        first.send_layer(i, kv[i])
    first.finish(timeout=10)
    assert_same_bytes(receiver.wait("dup", timeout=10).layer(3), kv[3])


def test_memory_budget_refuses_at_open_with_a_clear_error(layout):
    budget = layout.wire_bytes(100) + 10
    with Receiver(layout, max_bytes=budget) as rx, Sender(layout, rx.address) as tx:
        with pytest.raises(RequestRejected, match=r"needs \d+ bytes, more than the receiver's budget"):
            tx.open("huge", 1000)
        held = tx.open("fits", 100)  # fits alone, but a second one would not
        for i, tensors in enumerate(random_kv(layout, 100)):
            held.send_layer(i, tensors)
        held.finish(timeout=10)
        with pytest.raises(RequestRejected, match=r"receiver budget has \d+ of \d+ free"):
            send_all(tx, "second", random_kv(layout, 100), 100)
        rx.release("fits")
        send_all(tx, "third", random_kv(layout, 100), 100)
        assert rx.bytes_in_use == layout.wire_bytes(100)


def test_release_frees_memory_and_aborts_an_unfinished_sender(layout, receiver, sender):
    kv = random_kv(layout, 30)
    xfer = sender.open("gone", 30)
    xfer.send_layer(0, kv[0])
    got = receiver.wait("gone", timeout=10)
    got.wait_layer(0, timeout=10)
    assert receiver.bytes_in_use > 0
    got.release()
    assert receiver.bytes_in_use == 0
    wait_until(lambda: xfer.error is not None)
    with pytest.raises(TransferAborted, match="receiver released request 'gone' before it completed"):
        xfer.send_layer(1, kv[1])
    with pytest.raises(TransferAborted, match="receiver released request 'gone' before it completed"):
        xfer.finish(timeout=10)
    send_all(sender, "gone", kv, 30)  # the id is free again


def test_arrays_the_engine_keeps_are_never_reused_for_later_requests(layout, receiver, sender):
    """The receiver lands later requests in memory earlier ones let go of, never in memory
    the engine still holds (an array or a view of one) after releasing its request."""
    kept = []
    for n in range(6):
        kv = random_kv(layout, 1024, seed=n)  # (its last layer large enough to be reused)
        send_all(sender, f"r{n}", kv, 1024)
        with receiver.wait(f"r{n}", timeout=10) as got:
            layers = [got.layer(i) for i in range(layout.num_layers)]
        assert_same_bytes(layers[0], kv[0])
        if n % 2 == 0:  # the engine keeps these (one of them as a view), drops the others
            kept.append(([dict(t) for t in layers[:-1]] + [{k: v[:1] for k, v in layers[-1].items()}], kv))
    for layers, kv in kept:
        for got_layer, sent_layer in zip(layers[:-1], kv[:-1]):
            assert_same_bytes(got_layer, sent_layer)
        assert all(np.array_equal(layers[-1][k], v[:1]) for k, v in kv[-1].items())


def test_a_layer_is_confirmed_while_the_rest_of_its_request_has_not_come(layout, receiver, sender):
    """Acks of a request still arriving are held to go with its last layer's, but only for
    a moment: an engine reusing a layer's buffers once ``layer_sent`` says so is not kept
    waiting for layers it has not produced yet."""
    kv = random_kv(layout, 30)
    xfer = sender.open("partly", 30)
    xfer.send_layer(0, kv[0])
    xfer.send_layer(2, kv[2])
    wait_until(lambda: xfer.layer_sent(0) and xfer.layer_sent(2), what="the sent layers confirmed")
    assert not xfer.layer_sent(1) and not xfer.done
    xfer.send_layer(1, kv[1])
    xfer.send_layer(3, kv[3])
    xfer.finish(timeout=10)
    with receiver.wait("partly", timeout=10) as got:
        for layer, tensors in enumerate(kv):
            assert_same_bytes(got.layer(layer), tensors)


def test_a_remembered_failure_keeps_nothing_of_the_code_it_was_raised_in(layout, receiver, sender):
    """A failed request's error is kept (and raised again to whoever asks), but not the
    frames it passed through: raising the kept object itself attached each caller's
    frames, and every array they held, to it for as long as it was remembered (the soak's
    receiver grew by ~0.7 MiB a transfer)."""
    kv = random_kv(layout, 8)

    def engine(request_id):
        scratch = np.ones(1 << 18)  # the engine's own array, alive in the frame the error passes
        xfer = sender.open(request_id, 8, timeout=1.0)
        xfer.send_layer(0, kv[0])
        got = receiver.wait(request_id, timeout=5)
        with pytest.raises(TransferTimeout):
            got.wait_done(timeout=5)
        wait_until(lambda: xfer.error is not None)
        with pytest.raises(TransferTimeout):
            xfer.send_layer(1, kv[1])
        return weakref.ref(scratch)

    refs = [engine("doomed"), engine("doomed-too")]
    gc.collect()
    assert all(r() is None for r in refs)
    with pytest.raises(TransferTimeout, match="request 'doomed' from .* missed its deadline"):
        receiver.wait("doomed", timeout=1)  # still remembered, raised anew


def test_sender_side_timeout_aborts_the_request_on_the_receiver(layout, receiver, sender):
    xfer = sender.open("half", 8)
    xfer.send_layer(0, random_kv(layout, 8)[0])
    got = receiver.wait("half", timeout=5)
    with pytest.raises(ValueError):
        xfer.finish(timeout=0.1)  # layers missing: a caller bug, not a timeout
    xfer.abort("engine preempted the request")
    with pytest.raises(TransferAborted, match="aborted by the sender: request 'half': engine preempted the request"):
        got.wait_layer(2, timeout=5)


def test_receiver_closing_fails_the_senders_requests(layout):
    rx = Receiver(layout)
    with Sender(layout, rx.address) as tx:
        xfer = tx.open("orphan", 4)
        xfer.send_layer(0, random_kv(layout, 4)[0])
        rx.wait("orphan", timeout=5).wait_layer(0, timeout=5)
        rx.close()
        wait_until(lambda: xfer.error is not None)
        with pytest.raises(PeerLostError, match="request 'orphan': connection \\d to .* lost"):
            xfer.finish(timeout=5)
        wait_until(lambda: tx.num_streams == 0)
        with pytest.raises(PeerLostError, match="no live connection"):
            tx.open("after", 4)


def test_connecting_to_nothing_is_a_peer_lost_error(layout):
    with Receiver(layout) as rx:
        address = rx.address
    with pytest.raises(PeerLostError, match=f"cannot connect to {address}"):
        Sender(layout, address, timeout=2)


def test_open_validates_its_arguments(layout, sender):
    with pytest.raises(ValueError, match="num_tokens must be a non-negative int, got -1"):
        sender.open("r", -1)
    with pytest.raises(ValueError, match="request_id must be a non-empty str"):
        sender.open("", 1)
    with pytest.raises(
        ValueError, match=r"unknown codec 'zstd'; known codecs: \['fp8', 'int4', 'int8', 'none'\] and 'auto'"
    ):
        sender.open("r", 1, codec="zstd")


def test_without_ml_dtypes_bfloat16_and_fp8_travel_as_their_raw_bits():
    proc = run_program("without_ml_dtypes")
    out, err = proc.communicate(timeout=60)
    assert out.strip() == "ok", err


def test_a_completed_request_nobody_claims_is_freed_after_claim_timeout(layout):
    with Receiver(layout, claim_timeout_s=0.3) as rx, Sender(layout, rx.address) as tx:
        send_all(tx, "orphaned", random_kv(layout, 10), 10)
        assert rx.bytes_in_use > 0
        wait_until(lambda: rx.bytes_in_use == 0, timeout=5)
        send_all(tx, "claimed", random_kv(layout, 10), 10)
        got = rx.wait("claimed", timeout=5)
        in_use = rx.bytes_in_use
        send_all(tx, "later", random_kv(layout, 20), 20)  # completes after "claimed", unclaimed, another size
        # only "later" freed (not "claimed" too, nor instead): "claimed" had its turn and stayed
        wait_until(lambda: rx.bytes_in_use == in_use, timeout=5)
        assert got.layer(0)  # claimed requests stay until released
        got.release()


def test_a_request_released_before_it_arrives_is_refused():
    """The application gave up on it (e.g. recomputed): its sender hears so, nothing waits unclaimed."""
    from kvwire import KVLayout, Receiver, RequestRejected, Sender, TensorSpec

    layout = KVLayout([{"k": TensorSpec((2, 4), "float32", per_token=True)}])
    with Receiver(layout) as rx, Sender(layout, rx.address, streams=1) as tx:
        rx.release("gone")
        xfer = tx.open("gone", 3)
        xfer.send_layer(0, {"k": np.ones((3, 2, 4), np.float32)})
        with pytest.raises(RequestRejected, match="'gone' was released by the receiving application before it arrived"):
            xfer.finish(timeout=10)
        assert rx.bytes_in_use == 0
        again = tx.open("gone", 3)  # the id may be used again afterwards
        again.send_layer(0, {"k": np.ones((3, 2, 4), np.float32)})
        again.finish(timeout=10)
        with rx.wait("gone", timeout=10) as got:
            assert got.wait_all(timeout=10)[0]["k"].sum() == 24
