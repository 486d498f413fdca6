"""Codecs and paged KV over real sockets: what arrives is exactly what the codec defines."""

import ml_dtypes
import numpy as np
import pytest

from kvwire import KVLayout, Receiver, RequestRejected, Sender, TensorSpec
from kvwire.codecs import bits_to_float32, float32_to_bits, get_codec

from .support import assert_same_bytes

LAYOUT = KVLayout(
    [
        {"conv": TensorSpec((16, 4), "float32"), "recurrent": TensorSpec((2, 8, 8), "float32")},
        {"k": TensorSpec((2, 128), "bfloat16", per_token=True), "v": TensorSpec((2, 128), "bfloat16", per_token=True)},
    ]
)
RNG = np.random.default_rng(5)


def make_kv(tokens):
    return [
        {
            "conv": RNG.standard_normal((16, 4)).astype(np.float32),
            "recurrent": RNG.standard_normal((2, 8, 8)).astype(np.float32),
        },
        {n: RNG.standard_normal((tokens, 2, 128)).astype(ml_dtypes.bfloat16) for n in ("k", "v")},
    ]


def codec_round_trip(codec, array):
    """What the codec defines the receiver must hand back (CPU reference)."""
    tokens = array.shape[0]
    x = bits_to_float32(array.reshape(-1).view(np.uint8), "bfloat16").reshape(tokens, 2, 128)
    c = get_codec(codec)
    parts = c.encode(x)
    return float32_to_bits(c.decode(parts, tokens, 2, 128), "bfloat16").view(ml_dtypes.bfloat16).reshape(
        array.shape
    ), parts


@pytest.fixture
def pair():
    with Receiver(LAYOUT) as rx, Sender(LAYOUT, rx.address, streams=2) as tx:
        yield rx, tx


def send(tx, request_id, kv, tokens, codec="none", block_ids=None):
    xfer = tx.open(request_id, tokens, codec=codec)
    for i, tensors in enumerate(kv):
        xfer.send_layer(i, tensors, block_ids=block_ids)
    return xfer.finish(timeout=30)


@pytest.mark.parametrize("codec", ["fp8", "int8", "int4"])
def test_lossy_codecs_arrive_decoded_exactly_as_defined_and_states_stay_lossless(pair, codec):
    rx, tx = pair
    kv = make_kv(100)
    stats = send(tx, codec, kv, 100, codec=codec)
    with rx.wait(codec, timeout=5) as got:
        assert_same_bytes(got.layer(0), kv[0])  # fixed-size state: bit-exact
        layer1 = got.layer(1)
        for name in ("k", "v"):
            expected, _ = codec_round_trip(codec, kv[1][name])
            assert layer1[name].dtype == ml_dtypes.bfloat16
            assert layer1[name].tobytes() == expected.tobytes()
    assert stats.codec == codec
    assert stats.raw_bytes == LAYOUT.nbytes(100)
    assert stats.wire_bytes < (0.3 if codec == "int4" else 0.55) * stats.raw_bytes
    assert rx.bytes_in_use == 0


def test_keep_quantized_hands_back_codes_and_scales(pair):
    rx, tx = pair
    kv = make_kv(40)
    rx.expect("q", keep_quantized=True)
    send(tx, "q", kv, 40, codec="int8")
    layer1 = rx.wait("q", timeout=5).layer(1)
    _, (codes, scales) = codec_round_trip("int8", kv[1]["k"])
    assert sorted(layer1) == ["k", "k.scales", "v", "v.scales"]
    assert layer1["k"].dtype == np.int8 and np.array_equal(layer1["k"], codes)
    assert layer1["k.scales"].dtype == np.float16 and np.array_equal(layer1["k.scales"], scales)


@pytest.mark.parametrize("codec", ["none", "fp8"])
def test_paged_blocks_are_gathered_and_scattered_into_other_block_ids(pair, codec):
    rx, tx = pair
    block_size, tokens = 16, 37  # three blocks, the last one partial
    send_pool = {n: RNG.standard_normal((10, block_size, 2, 128)).astype(ml_dtypes.bfloat16) for n in ("k", "v")}
    send_ids, recv_ids = [7, 2, 5], [0, 9, 3]
    recv_pool = {n: np.zeros((12, block_size, 2, 128), ml_dtypes.bfloat16) for n in ("k", "v")}
    rx.expect("paged", {1: recv_pool}, block_ids=recv_ids)
    kv = make_kv(0)
    xfer = tx.open("paged", tokens, codec=codec)
    xfer.send_layer(0, kv[0])
    xfer.send_layer(1, send_pool, block_ids=send_ids)
    xfer.finish(timeout=10)
    got = rx.wait("paged", timeout=5)
    got.wait_done(timeout=5)
    for name in ("k", "v"):
        sent = send_pool[name].reshape(-1, 2, 128)[
            (np.array(send_ids)[:, None] * block_size + np.arange(block_size)).reshape(-1)[:tokens]
        ]
        expected = sent if codec == "none" else codec_round_trip(codec, sent)[0]
        landed = recv_pool[name].reshape(-1, 2, 128)[
            (np.array(recv_ids)[:, None] * block_size + np.arange(block_size)).reshape(-1)[:tokens]
        ]
        assert landed.tobytes() == expected.tobytes()
        assert got.layer(1)[name].tobytes() == expected.tobytes()
        untouched = np.delete(recv_pool[name], recv_ids, axis=0)
        assert not untouched.view(np.uint16).any()
        assert not recv_pool[name][3, tokens - 32 :].view(np.uint16).any()  # the partial block's tail
    got.release()


def test_paged_send_errors_name_the_tensor_and_the_problem(pair):
    _, tx = pair
    pool = {n: np.zeros((4, 16, 2, 128), ml_dtypes.bfloat16) for n in ("k", "v")}
    xfer = tx.open("bad-blocks", 20)
    with pytest.raises(ValueError, match=r"layer 1 tensor 'k': 20 tokens in blocks of 16 need 2 block ids, got 3"):
        xfer.send_layer(1, pool, block_ids=[0, 1, 2])
    with pytest.raises(ValueError, match=r"layer 1 tensor 'k': block ids must be in \[0, 4\), got 1..4"):
        xfer.send_layer(1, pool, block_ids=[1, 4])
    with pytest.raises(
        ValueError, match=r"layer 1 tensor 'k': a paged pool must be \[num_blocks, block_size, \*\[2, 128\]\]"
    ):
        xfer.send_layer(1, {"k": np.zeros((4, 16, 3, 128), ml_dtypes.bfloat16), "v": pool["v"]}, block_ids=[0, 1])
    xfer.abort()


def test_receiver_pool_that_does_not_fit_rejects_the_request_on_both_sides(pair):
    rx, tx = pair
    rx.expect("misfit", {1: {"k": np.zeros((2, 16, 2, 128), ml_dtypes.bfloat16)}}, block_ids=[0, 1, 5])
    with pytest.raises(RequestRejected, match=r"block ids must be in \[0, 2\), got 0..5"):
        send(tx, "misfit", make_kv(40), 40)


def test_nan_under_a_lossy_codec_is_a_value_error_at_send_layer(pair):
    _, tx = pair
    kv = make_kv(8)
    kv[1]["v"][3, 1, 5] = np.nan
    xfer = tx.open("nan", 8, codec="fp8")
    with pytest.raises(ValueError, match="layer 1 tensor 'v': NaN or Inf in the input; a lossy codec cannot scale it"):
        xfer.send_layer(1, kv[1])
    xfer.abort()


def test_auto_codec_uses_measured_goodput_and_needs_a_prefill_time(pair):
    rx, tx = pair
    with pytest.raises(ValueError, match="codec='auto' needs prefill_s"):
        tx.open("auto", 10, codec="auto")
    send(tx, "warmup", make_kv(2000), 2000)  # gives the sender a goodput measurement
    rx.release("warmup")
    assert tx.choose_codec(2000, prefill_s=1e9) == "none"  # a glacial prefill: the link keeps up
    assert tx.choose_codec(2000, prefill_s=1e-9) == "int4"  # an instant prefill: the link cannot
    xfer = tx.open("auto", 100, codec="auto", prefill_s=1e-9)
    for i, tensors in enumerate(make_kv(100)):
        xfer.send_layer(i, tensors)
    assert xfer.finish(timeout=10).codec == "int4"
