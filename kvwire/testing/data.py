"""Reproducible KV for tests and benchmarks: both ends of a transfer can make the same data."""

from __future__ import annotations

import zlib

import numpy as np

from ..dtypes import numpy_dtype
from ..layout import KVLayout


def random_kv(layout: KVLayout, num_tokens: int, seed: int | str = 0) -> list[dict[str, np.ndarray]]:
    """Random raw bits in every tensor of a request (NaN payloads and odd bit patterns
    included), one dict per layer; ``seed`` may be a string such as a request id."""
    rng = np.random.default_rng(zlib.crc32(seed.encode()) if isinstance(seed, str) else seed)
    out = []
    for layer in layout.layers:
        tensors = {}
        for name, spec in layer.items():
            shape = spec.full_shape(num_tokens)
            raw = rng.integers(0, 256, size=int(np.prod(shape, dtype=np.int64)) * spec.itemsize, dtype=np.uint8)
            tensors[name] = raw.view(numpy_dtype(spec.dtype)).reshape(shape)
        out.append(tensors)
    return out
