"""One RequestPlan cuts a request on both sides: the sender's chunk pieces and the
receiver's targets cover exactly the same bytes, for any layout, length, codec and chunk
size (a property test), and the per-request checks of a Data frame live in the plan."""

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from kvwire import KVLayout, TensorSpec
from kvwire.inbound import InboundRequest
from kvwire.layer_bytes import LayerBytes
from kvwire.outbound import Transfer
from kvwire.protocol import FakeClock, RequestPlan, SegmentMap
from kvwire.protocol.sending import SenderBook


class Queue:
    """What a Transfer needs of the sender's outbox here: where send_layer hands a layer."""

    def __init__(self):
        self.queued = []

    def submit(self, request, layers):
        self.queued += [(layer, request.plan.num_chunks[layer]) for layer in layers]
        return False  # a writer's to write


tensor = st.builds(
    lambda dims, dtype, per_token: TensorSpec(tuple(dims), dtype, per_token),
    st.lists(st.integers(1, 6), min_size=1, max_size=3),
    st.sampled_from(["float32", "bfloat16", "float16", "int8"]),
    st.booleans(),
)
layouts = st.lists(st.dictionaries(st.sampled_from("abcdefgh"), tensor, min_size=1, max_size=4),
                   min_size=1, max_size=3).map(KVLayout)


def arrays_for(layout: KVLayout, num_tokens: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for layer in layout.layers:
        arrays = {}
        for name, spec in layer.items():
            shape = spec.full_shape(num_tokens)
            if spec.dtype == "int8":
                arrays[name] = rng.integers(-128, 128, shape).astype(np.int8)
            elif spec.dtype == "bfloat16":
                arrays[name] = rng.standard_normal(shape).astype(ml_dtypes.bfloat16)
            else:
                arrays[name] = rng.standard_normal(shape).astype(spec.dtype)
        out.append(arrays)
    return out


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layout=layouts, num_tokens=st.integers(0, 12), codec=st.sampled_from(["none", "fp8", "int8", "int4"]),
       chunk_bytes=st.integers(4096, 5000) | st.integers(1, 700), seed=st.integers(0, 1000))
def test_sender_pieces_and_receiver_targets_cover_the_same_bytes(layout, num_tokens, codec, chunk_bytes, seed):
    try:
        plan = RequestPlan(layout, num_tokens, codec, chunk_bytes)
    except ValueError:  # a codec that cannot carry some tensor of the layout
        assume(False)
    queue, layers = Queue(), LayerBytes(plan, "r", device_memory=False)
    request = SenderBook("peer", 1, max_queued_chunks=64, clock=FakeClock()).open("r", plan, 30.0)
    sending = Transfer(request, queue, layers, clock=FakeClock())
    opening = request.opening  # the receiver rebuilds the plan from the Open
    receiving = InboundRequest("r", RequestPlan(layout, opening.num_tokens, opening.codec, opening.chunk_bytes), 30.0,
                               "peer", clock=FakeClock())
    assert sending.num_chunks == receiving.num_chunks
    sent = arrays_for(layout, num_tokens, seed)
    for layer, arrays in enumerate(sent):
        sending.send_layer(layer, arrays)
        for chunk in range(sending.num_chunks[layer]):
            pieces, nbytes, _ = layers.chunk(layer, chunk)
            data = b"".join(bytes(memoryview(p).cast("B")) for p in pieces)
            targets = receiving.targets(layer, chunk)
            assert len(data) == nbytes == sum(len(t) for t in targets) == receiving.plan.chunk_size(layer, chunk)
            assert receiving.plan.check_data(layer, chunk, nbytes) is None
            position = 0
            for target in targets:
                target[:] = np.frombuffer(data[position:position + len(target)], dtype=np.uint8)
                position += len(target)
            receiving.record_chunk(layer, chunk)
        assert receiving.finish_layer(layer) == (layer == layout.num_layers - 1)
        got = receiving.wait_layer(layer, 0)
        for name, array in arrays.items():
            if codec == "none" or not layout.layers[layer][name].per_token or \
                    layout.layers[layer][name].dtype == "int8":
                assert got[name].tobytes() == array.tobytes(), (layer, name)
            else:
                assert got[name].shape == array.shape  # decoded from the lossy wire form
    assert queue.queued == [(layer, n) for layer, n in enumerate(sending.num_chunks)]


def test_a_data_frame_is_checked_against_the_plan():
    layout = KVLayout([{"kv": TensorSpec((2, 4), "float32", per_token=True)}])
    plan = RequestPlan(layout, num_tokens=10, codec="none", chunk_bytes=100)
    assert plan.num_chunks == [4] and plan.chunk_span(0, 3) == (300, 320)
    assert plan.check_data(0, 3, 20) is None
    assert plan.check_data(1, 0, 100) == "frame for layer 1, the layout has 1"
    assert plan.check_data(0, 4, 100) == "layer 0 chunk 4 out of range (4 chunks)"
    assert plan.check_data(0, 3, 100) == "layer 0 chunk 3 has 100 bytes, expected 20"
    with pytest.raises(ValueError, match="unknown codec 'zip'"):
        RequestPlan(layout, 10, "zip", 100)


def test_segment_spans_name_each_byte_once_in_order():
    segments = SegmentMap([(0, 10), (10, 0), (10, 54), (64, 6)])
    assert segments.spans(5, 70) == [(0, 5, 10), (2, 0, 54), (3, 0, 6)]
    assert segments.spans(64, 66) == [(3, 0, 2)]
    assert segments.spans(70, 70) == []


def test_deadlines_follow_the_clock_given():
    clock = FakeClock(100.0)
    layout = KVLayout([{"s": TensorSpec((4,), "float32")}])
    request = InboundRequest("r", RequestPlan(layout, 0, "none", 64), 5.0, "peer", clock=clock)
    assert (request.opened_at, request.deadline) == (100.0, 105.0)
    clock.advance(2.5)
    request.record_chunk(0, 0)
    request.finish_layer(0)
    assert request.finished_at == 102.5
    with pytest.raises(ValueError, match="does not go back"):
        clock.advance(-1)


def test_a_receiver_s_deadlines_run_on_its_clock_without_sleeping_them():
    """A request opened with a 60 s deadline fails when the receiver's clock passes it,
    whatever the wall clock says (the deadline loop reads the clock it is given)."""
    from kvwire import Receiver, Sender, TransferTimeout

    layout = KVLayout([{"s": TensorSpec((4,), "float32")}])
    clock = FakeClock(1000.0)
    with Receiver(layout, clock=clock) as rx:
        with Sender(layout, rx.address, streams=1) as tx:
            tx.open("late", 0, timeout=60.0)
            handle = rx.wait("late", timeout=10)
            clock.advance(59.0)
            with pytest.raises(TransferTimeout, match="layer 0 not arrived after 0.3s"):
                handle.wait_layer(0, timeout=0.3)  # not yet past its deadline: still open
            clock.advance(2.0)
            with pytest.raises(TransferTimeout, match="request 'late' from .* missed its deadline"):
                handle.wait_layer(0, timeout=10)


def test_a_confirmed_request_lets_its_bytes_go_and_a_chunk_taken_late_builds_no_frame():
    """The last ack can arrive while a writer builds a frame of a re-sent copy: it must send
    nothing rather than a header without its bytes (which would desynchronize the stream)."""
    layout = KVLayout([{"s": TensorSpec((1024,), "uint8")}])
    layers = LayerBytes(RequestPlan(layout, 0, "none", 4096), "r", device_memory=False)
    state = np.arange(1024, dtype=np.uint8)
    layers.take({0: {"s": state}})
    _header, *payload = layers.frame(1, 0, 0, device_memory=False)
    assert b"".join(bytes(piece) for piece in payload) == state.tobytes()
    layers.release()
    assert layers.has(0) and layers.chunk(0, 0) is None and layers.frame(1, 0, 0, device_memory=False) is None
    assert not layers.joinable(0)
