"""Frame checksums: xxh3-64 over a frame's payload, seeded with its header fields.

Seeding with (request, layer, chunk, length) means a bit flip in the header that still
decodes (a chunk landing at the wrong offset) fails verification like a flipped payload.
"""

from __future__ import annotations

import array
import struct
from collections.abc import Iterable, Sequence

import xxhash

from .. import native

_FIELDS = struct.Struct("<QIIQ")


def frame_seed(rid: int, layer: int, chunk: int, nbytes: int) -> int:
    """The hash seed that binds a frame's checksum to its place in the request."""
    return xxhash.xxh3_64_intdigest(_FIELDS.pack(rid, layer, chunk, nbytes))


def frame_checksum(rid: int, layer: int, chunk: int, pieces: Iterable[memoryview], nbytes: int) -> int:
    return _digest(frame_seed(rid, layer, chunk, nbytes), pieces)


def layers_checksum(rid: int, layers: Sequence[int], pieces: Iterable[memoryview], nbytes: int) -> int:
    """The checksum of a ``Layers`` frame: seeded with its request, its length and which
    layers it carries, in their order (so a frame whose list was altered fails too)."""
    seed = xxhash.xxh3_64_intdigest(_FIELDS.pack(rid, 0, len(layers), nbytes) + array.array("I", layers).tobytes())
    return _digest(seed, pieces)


def _digest(seed: int, pieces: Iterable[memoryview]) -> int:
    return native.xxh3_pieces(seed, pieces if type(pieces) is list else list(pieces))
