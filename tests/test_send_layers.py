"""Layers handed over together (``Transfer.send_layers``): the same bytes as one call per
layer, small whole layers sharing one ``Layers`` frame, refused whole or not at all, and
that frame checked, answered and de-duplicated like the Data frames it stands for."""

from __future__ import annotations

import numpy as np
import pytest

from kvwire import IntegrityError, Receiver, Sender
from kvwire.layer_bytes import LayerBytes
from kvwire.testing.relay import Fault, FaultyRelay
from kvwire.wire import framing
from kvwire.wire.checksum import frame_checksum, layers_checksum
from kvwire.wire.messages import Data, Layers

from .support import assert_same_bytes, random_kv

SECRET = b"test-secret"


def frames_sent(monkeypatch) -> list[str]:
    """Which frames the senders build from now on: "data" or "layers" (a tally of the real
    calls, which still run)."""
    built = []
    single, joined = LayerBytes.frame, LayerBytes.frame_layers
    monkeypatch.setattr(LayerBytes, "frame", lambda self, *a: built.append("data") or single(self, *a))
    monkeypatch.setattr(LayerBytes, "frame_layers", lambda self, *a: built.append("layers") or joined(self, *a))
    return built


@pytest.mark.parametrize("into", ["own", "expect"])
def test_layers_sent_together_arrive_exactly_in_one_frame(layout, receiver, sender, into, monkeypatch):
    built = frames_sent(monkeypatch)
    kv = random_kv(layout, 40, seed=into)
    mine = {layer: {name: np.zeros_like(a) for name, a in tensors.items()} for layer, tensors in enumerate(kv)}
    if into == "expect":
        receiver.expect("together", mine)
    xfer = sender.open("together", 40)
    xfer.send_layers(dict(enumerate(kv)))
    xfer.finish(timeout=30)
    assert built == ["layers"]  # four small whole layers: one frame
    with receiver.wait("together", timeout=10) as got:
        for layer, tensors in enumerate(kv):
            assert_same_bytes(got.layer(layer), tensors)
            if into == "expect":
                assert all(np.shares_memory(got.layer(layer)[name], mine[layer][name]) for name in tensors)


def test_a_layer_cut_in_chunks_goes_in_data_frames_beside_the_joined_ones(layout, receiver, monkeypatch):
    built = frames_sent(monkeypatch)
    kv = random_kv(layout, 3000)  # the MLA layer, ~480 KB, in 64 KiB chunks
    with Sender(layout, receiver.address, secret=SECRET, streams=1, chunk_bytes=64 << 10) as tx:
        xfer = tx.open("mixed", 3000)
        xfer.send_layer(0, kv[0])
        xfer.send_layers({3: kv[3], 2: kv[2], 1: kv[1]})
        xfer.finish(timeout=30)
    assert xfer.num_chunks[3] == 8
    assert sorted(built) == ["data"] * (1 + 8) + ["layers"]  # layer 0, the MLA layer's chunks; layers 2 and 1
    with receiver.wait("mixed", timeout=10) as got:
        for layer, tensors in enumerate(kv):
            assert_same_bytes(got.layer(layer), tensors)


def test_a_lossy_codec_gives_the_same_arrays_either_way(layout, receiver, sender):
    rng = np.random.default_rng(7)  # finite values (a lossy codec refuses NaN), float32 and bfloat16
    kv = [{name: rng.standard_normal(a.shape).astype(a.dtype) for name, a in layer.items()} for layer in random_kv(layout, 64)]
    one_by_one = sender.open("one-by-one", 64, codec="int8")
    for layer, tensors in enumerate(kv):
        one_by_one.send_layer(layer, tensors)
    one_by_one.finish(timeout=30)
    together = sender.open("together", 64, codec="int8")
    together.send_layers(dict(enumerate(kv)))
    together.finish(timeout=30)
    with receiver.wait("one-by-one", timeout=10) as first, receiver.wait("together", timeout=10) as second:
        for layer in range(len(kv)):
            assert_same_bytes(second.layer(layer), first.layer(layer))


def test_one_refused_layer_refuses_them_all(layout, receiver, sender):
    kv = random_kv(layout, 10)
    xfer = sender.open("refused", 10)
    wrong = dict(kv[2], recurrent=kv[2]["recurrent"][:1])
    with pytest.raises(ValueError, match=r"request 'refused' layer 2 tensor 'recurrent': expected float32\[2, 32, 32\]"):
        xfer.send_layers({0: kv[0], 1: kv[1], 2: wrong})
    with pytest.raises(ValueError, match="request 'refused': layer 7 out of range \\(layout has 4\\)"):
        xfer.send_layers({0: kv[0], 7: kv[0]})
    with pytest.raises(ValueError, match=r"request 'refused': finish\(\) before layers \[0, 1, 2, 3\] were sent"):
        xfer.finish(timeout=5)
    xfer.send_layers({0: kv[0], 1: kv[1]})  # nothing of the refused calls was queued
    with pytest.raises(ValueError, match="request 'refused': layer 1 was already sent"):
        xfer.send_layers({2: kv[2], 1: kv[1]})
    xfer.send_layers({2: kv[2], 3: kv[3]})
    xfer.finish(timeout=30)
    with receiver.wait("refused", timeout=10) as got:
        assert_same_bytes(got.layer(2), kv[2])


def test_a_flipped_bit_in_a_joined_frame_fails_the_request_naming_its_first_layer(layout, receiver):
    kv = random_kv(layout, 20)
    with FaultyRelay(receiver.address, Fault(flip_bit_at=3000)) as relay:  # in the first layer (10 KiB) after the handshake
        with Sender(layout, relay.address, secret=SECRET, streams=1) as tx:
            xfer = tx.open("flipped", 20)
            xfer.send_layers(dict(enumerate(kv)))
            with pytest.raises(IntegrityError, match="request 'flipped' layer 0 chunk 0: checksum mismatch"):
                xfer.finish(timeout=10)
            with pytest.raises(IntegrityError, match="checksum mismatch, the data was corrupted in transit"):
                receiver.wait("flipped", timeout=5).wait_layer(1, timeout=5)
    assert receiver.bytes_in_use == 0


def test_a_layer_already_here_is_acked_again_not_written_over(layout):
    """A resumed sender re-sends the layers it had no ack for, perhaps joined otherwise than
    before: a layer that arrived keeps its bytes, the others of the frame land."""
    kv = random_kv(layout, 8)
    with Receiver(layout, "127.0.0.1:0", secret=SECRET) as rx, Sender(layout, rx.address, secret=SECRET, streams=1) as tx:
        xfer = tx.open("again", 8)
        got = rx.wait("again", timeout=10)
        conn, rid = tx.connections[0], xfer.rid
        sizes = [xfer.plan.layers[layer].nbytes for layer in (0, 1)]
        assert sizes == [kv[0]["conv"].nbytes + kv[0]["recurrent"].nbytes] * 2  # (no padding between them)
        first = [kv[0]["conv"], kv[0]["recurrent"]]
        conn.send([framing.encode(Data(rid, 0, 0, sizes[0], frame_checksum(rid, 0, 0, first, sizes[0]))), *first])
        got.wait_layer(0, timeout=10)
        other = [np.ones_like(kv[0]["conv"]), np.ones_like(kv[0]["recurrent"]), kv[1]["conv"], kv[1]["recurrent"]]
        checksum = layers_checksum(rid, [0, 1], other, sum(sizes))
        conn.send([framing.encode(Layers(rid, [0, 1], sum(sizes), checksum)), *other])
        assert_same_bytes(got.wait_layer(1, timeout=10), kv[1])
        assert_same_bytes(got.layer(0), kv[0])  # not the copy's ones
        xfer.abort("the test sent the frames itself")
        got.release()
