"""A frame checksum a GPU computes where the data is: per-block digests, combined on host.

xxh3 is sequential within a frame, so checking GPU-resident KV with it means copying the
frame to host first. This checksum splits a frame's payload into 4 KiB blocks; each
block's digest is ``sum(word[i] * K[i]) mod 2**64`` over its 1024 little-endian uint32
words (the tail zero-padded), with fixed odd multipliers K. A CUDA block computes one
digest (kvwire.cuda.checksum), so only 8 bytes per 4 KiB leave the device; the digests
are then hashed on host with xxh3, seeded with the frame's header fields and length,
exactly as kvwire.wire.checksum seeds its xxh3.

Every single-bit error changes the digest of its block (K[i] is odd, so
``K[i] * 2**k != 0 mod 2**64``); moved or swapped words change it unless their
multipliers collide. It guards against corruption, like the xxh3 checksum: integrity
against an attacker is TLS's job, authenticity the handshake's.

This module is the definition and the CPU path; the kernel must give identical digests.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import xxhash

from .checksum import frame_seed

BLOCK_BYTES = 4096
BLOCK_WORDS = BLOCK_BYTES // 4


def _splitmix64(x: int) -> int:
    mask = (1 << 64) - 1
    x = (x + 0x9E3779B97F4A7C15) & mask
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
    return x ^ (x >> 31)


MULTIPLIERS = np.array([_splitmix64(i) | 1 for i in range(BLOCK_WORDS)], dtype=np.uint64)


def num_blocks(nbytes: int) -> int:
    return -(-nbytes // BLOCK_BYTES)


def block_digests(payload) -> np.ndarray:
    """The uint64 digest of every 4 KiB block of a contiguous byte payload (CPU path)."""
    data = np.frombuffer(memoryview(payload).cast("B"), dtype=np.uint8)
    blocks = num_blocks(data.size)
    padded = np.zeros(blocks * BLOCK_BYTES, dtype=np.uint8)
    padded[: data.size] = data
    words = padded.view("<u4").reshape(blocks, BLOCK_WORDS).astype(np.uint64)
    with np.errstate(over="ignore"):
        return (words * MULTIPLIERS).sum(axis=1, dtype=np.uint64)


def combine(rid: int, layer: int, chunk: int, nbytes: int, digests: np.ndarray) -> int:
    """The frame checksum from its block digests (host side of both paths)."""
    return xxhash.xxh3_64_intdigest(np.ascontiguousarray(digests, dtype="<u8").tobytes(),
                                    seed=frame_seed(rid, layer, chunk, nbytes))


def frame_blocksum(rid: int, layer: int, chunk: int, pieces: Iterable[memoryview], nbytes: int) -> int:
    """The checksum of a frame whose payload is ``pieces`` in order (host memory)."""
    views = [memoryview(p).cast("B") for p in pieces]
    payload = views[0] if len(views) == 1 else b"".join(views)
    if len(payload) != nbytes:
        raise ValueError(f"frame pieces hold {len(payload)} bytes, the frame says {nbytes}")
    return combine(rid, layer, chunk, nbytes, block_digests(payload))
