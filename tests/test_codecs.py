"""Codecs on the CPU: exact rounding, documented error bounds, clear refusals, auto choice."""

import ml_dtypes
import numpy as np
import pytest

from kvwire.codecs import (
    E4M3_VALUES,
    FP8_BLOCK_TOKENS,
    choose_codec,
    float32_to_bits,
    float32_to_e4m3,
    get_codec,
)

RNG = np.random.default_rng(42)


def kv(tokens, heads, dim, scale=1.0):
    return (RNG.standard_normal((tokens, heads, dim)) * scale).astype(np.float32)


def test_e4m3_rounding_matches_ml_dtypes_everywhere():
    magnitudes = 10.0 ** RNG.uniform(-12, np.log10(448), 300_000)
    x = (magnitudes * RNG.choice([-1, 1], magnitudes.size)).astype(np.float32)
    edges = [0.0, -0.0, 448.0, -448.0, 2**-9, 2**-10, 3 * 2**-10, 2**-6, 2**-6 - 2**-10, 240.0, 232.0, 1.0625, 1.1875]
    x = np.concatenate([x, np.array(edges, np.float32)])
    assert np.array_equal(float32_to_e4m3(x), x.astype(ml_dtypes.float8_e4m3fn).view(np.uint8))
    codes = np.arange(256, dtype=np.uint8)
    finite = ~np.isnan(E4M3_VALUES)
    assert np.array_equal(E4M3_VALUES[finite], codes.view(ml_dtypes.float8_e4m3fn).astype(np.float32)[finite])


def test_bfloat16_rounding_matches_ml_dtypes():
    x = (RNG.standard_normal(100_000) * 10.0 ** RNG.integers(-40, 38, 100_000)).astype(np.float32)
    assert np.array_equal(float32_to_bits(x, "bfloat16").view(np.uint16), x.astype(ml_dtypes.bfloat16).view(np.uint16))


def test_fp8_error_is_within_half_an_e4m3_step_of_its_block_scale():
    x = kv(37, 4, 128, scale=3.0)
    codec = get_codec("fp8")
    codes, scales = codec.encode(x)
    assert codes.shape == (37, 4, 128) and scales.shape == (3, 4) and scales.dtype == np.float32
    y = codec.decode([codes, scales], 37, 4, 128)
    s = np.repeat(scales, FP8_BLOCK_TOKENS, axis=0)[:37][:, :, None]
    q = np.abs(x) / s
    step = np.where(q >= 2**-6, 2.0 ** (np.floor(np.log2(np.maximum(q, 2**-6))) - 3), 2.0**-9) * s
    assert np.all(np.abs(y - x) <= step / 2 * (1 + 1e-6))
    assert np.allclose(np.abs(x).reshape(-1, 4, 128).max(axis=2).max(), 448 * scales.max(), rtol=1e-6)


@pytest.mark.parametrize("name, qmax", [("int8", 127), ("int4", 7)])
def test_integer_codecs_err_at_most_half_a_step(name, qmax):
    x = kv(21, 2, 256, scale=5.0)
    codec = get_codec(name)
    codes, scales = codec.encode(x)
    y = codec.decode([codes, scales], 21, 2, 256)
    assert scales.dtype == np.float16
    step = scales.astype(np.float32)
    if name == "int4":
        assert codes.shape == (21, 2, 128) and scales.shape == (21, 2, 2)
        step = np.repeat(step, 128, axis=2)
    else:
        assert codes.shape == (21, 2, 256) and codes.dtype == np.int8 and scales.shape == (21, 2)
        step = step[:, :, None]
    assert np.all(np.abs(y - x) <= step / 2 * (1 + 1e-3))


@pytest.mark.parametrize("name", ["fp8", "int8", "int4"])
def test_zeros_round_trip_exactly_and_nan_or_inf_is_refused(name):
    codec = get_codec(name)
    zeros = np.zeros((5, 2, 128), np.float32)
    assert not codec.decode(codec.encode(zeros), 5, 2, 128).any()
    for bad in (np.nan, np.inf):
        x = kv(5, 2, 128)
        x[3, 1, 7] = bad
        with pytest.raises(
            ValueError, match="layer 3 tensor 'k': NaN or Inf in the input; a lossy codec cannot scale it"
        ):
            codec.encode(x, "layer 3 tensor 'k'")


@pytest.mark.parametrize(
    "heads, dim, limits",
    [(8, 128, {"fp8": 0.52, "int8": 0.52, "int4": 0.27}), (1, 512, {"fp8": 0.52, "int8": 0.52, "int4": 0.27})],
)
def test_wire_size_targets_against_bfloat16_scales_included(heads, dim, limits):
    tokens = 4096
    for name, limit in limits.items():
        parts = get_codec(name).encode(kv(tokens, heads, dim))
        ratio = sum(p.nbytes for p in parts) / (tokens * heads * dim * 2)
        assert ratio <= limit, (name, ratio)


def test_int4_refuses_a_dimension_it_cannot_pack():
    with pytest.raises(ValueError, match="int4 needs an even last dimension divisible by its group \\(128\\), got 200"):
        get_codec("int4").encode(kv(2, 1, 200), "tensor 'x'")


WIRE = {"none": 1000, "int8": 510, "fp8": 505, "int4": 260}


@pytest.mark.parametrize(
    "goodput_bps, prefill_s, expected",
    [
        (0, 1.0, "none"),  # nothing measured: keep full precision
        (10_000, 1.0, "none"),  # 1000 B/s of KV, link carries 1125 B/s
        (5_000, 1.0, "int8"),  # 562 B/s: 510 fits, 1000 does not
        (4_000, 1.0, "int4"),  # 450 B/s: only 260 fits
        (1_000, 1.0, "int4"),  # nothing fits: the smallest
        (10_000, 0.5, "int8"),  # the same KV in half the time needs twice the link
    ],
)
def test_auto_picks_the_least_lossy_codec_that_keeps_up(goodput_bps, prefill_s, expected):
    name, reason = choose_codec(WIRE, prefill_s, goodput_bps)
    assert name == expected, reason


def test_auto_needs_a_positive_prefill_time():
    with pytest.raises(ValueError, match="prefill_s must be positive, got 0"):
        choose_codec(WIRE, 0, 1e9)
