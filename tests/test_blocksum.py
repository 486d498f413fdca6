"""The blocksum frame checksum (GPU-computable): what it detects, and its exact definition."""

import numpy as np
import pytest

from kvwire.wire import blocksum

RNG = np.random.default_rng(5)


def test_definition_on_a_hand_computed_block():
    payload = np.zeros(8, np.uint8)
    payload[0], payload[4] = 3, 1  # words 3 and 1, then 1022 zero words of padding
    (digest,) = blocksum.block_digests(payload)
    expected = (3 * int(blocksum.MULTIPLIERS[0]) + int(blocksum.MULTIPLIERS[1])) % 2**64
    assert int(digest) == expected
    assert all(int(k) % 2 == 1 for k in blocksum.MULTIPLIERS)


def test_every_single_bit_flip_is_detected():
    payload = RNG.integers(0, 256, 3 * 4096 + 17, dtype=np.uint8)
    good = blocksum.frame_blocksum(1, 0, 0, [payload], payload.size)
    for position in range(0, payload.size, 97):
        for bit in (0, 5, 7):
            bad = payload.copy()
            bad[position] ^= 1 << bit
            assert blocksum.frame_blocksum(1, 0, 0, [bad], bad.size) != good


def test_swapped_words_and_header_fields_are_detected():
    payload = RNG.integers(0, 256, 8192, dtype=np.uint8)
    good = blocksum.frame_blocksum(1, 2, 3, [payload], 8192)
    swapped = payload.copy()
    swapped[0:4], swapped[4:8] = payload[4:8], payload[0:4]
    assert blocksum.frame_blocksum(1, 2, 3, [swapped], 8192) != good
    assert blocksum.frame_blocksum(1, 2, 4, [payload], 8192) != good  # another chunk's frame
    moved = np.concatenate([payload[4096:], payload[:4096]])  # blocks in the wrong order
    assert blocksum.frame_blocksum(1, 2, 3, [moved], 8192) != good


def test_pieces_are_one_stream_and_must_add_up():
    payload = RNG.integers(0, 256, 10000, dtype=np.uint8)
    whole = blocksum.frame_blocksum(9, 1, 0, [payload], 10000)
    assert blocksum.frame_blocksum(9, 1, 0, [payload[:123], payload[123:5000], payload[5000:]], 10000) == whole
    with pytest.raises(ValueError, match="frame pieces hold 10000 bytes, the frame says 10001"):
        blocksum.frame_blocksum(9, 1, 0, [payload], 10001)
