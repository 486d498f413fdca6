"""Paged KV: a request's tokens live in blocks scattered through an engine's pool.

vLLM-style pools are ``[num_blocks, block_size, *per_token_shape]`` per tensor (K and V
separately; an MLA latent has one). A request owns a list of block ids; its token t is
row ``block_ids[t // block_size] * block_size + t % block_size`` of the pool flattened
to rows, and only the first ``num_tokens`` rows count (the last block may be partial).
The sender gathers those rows into one contiguous wire buffer; the receiver scatters
them into its own block ids.
"""

from __future__ import annotations

import math

import numpy as np

from . import arrays, dtypes


def token_rows(block_ids, block_size: int, num_tokens: int, num_blocks: int, where: str) -> np.ndarray:
    """Pool row of every token of the request, after checking the block ids fit."""
    ids = np.asarray(block_ids, dtype=np.int64).reshape(-1)
    needed = -(-num_tokens // block_size) if block_size else 0
    if len(ids) != needed:
        raise ValueError(
            f"{where}: {num_tokens} tokens in blocks of {block_size} need {needed} block ids, got {len(ids)}"
        )
    if len(ids) and (ids.min() < 0 or ids.max() >= num_blocks):
        raise ValueError(f"{where}: block ids must be in [0, {num_blocks}), got {ids.min()}..{ids.max()}")
    return (ids[:, None] * block_size + np.arange(block_size, dtype=np.int64)).reshape(-1)[:num_tokens]


def pool_geometry(shape: tuple[int, ...], spec, where: str) -> tuple[int, int]:
    """(num_blocks, block_size) of a pool for a per-token tensor, checking its shape."""
    if len(shape) < 2 or math.prod(shape[2:]) != math.prod(spec.shape):
        raise ValueError(
            f"{where}: a paged pool must be [num_blocks, block_size, *{list(spec.shape)}] "
            f"(or any shape with {math.prod(spec.shape)} values per token), got {list(shape)}"
        )
    return shape[0], shape[1]


def gather(pool, block_ids, num_tokens: int, spec, where: str) -> np.ndarray:
    """The request's tokens from a host pool, contiguous, in the layout's dtype bits."""
    flat, shape, dtype = arrays.as_bytes(pool)
    if not dtypes.accepts(spec.dtype, dtype):
        raise ValueError(f"{where}: pool dtype {dtype}, layout says {spec.dtype}")
    num_blocks, block_size = pool_geometry(shape, spec, where)
    rows = token_rows(block_ids, block_size, num_tokens, num_blocks, where)
    row_bytes = spec.nbytes(1)
    gathered = flat.reshape(num_blocks * block_size, row_bytes)[rows]
    return gathered.reshape(-1).view(np.uint8)


def pool_rows_view(pool, spec, where: str) -> tuple[np.ndarray, int, int]:
    """A writable (rows, bytes per token) uint8 view of a host pool, and its geometry."""
    flat, shape, dtype = arrays.writable_bytes(pool)
    if not dtypes.accepts(spec.dtype, dtype):
        raise ValueError(f"{where}: pool dtype {dtype}, layout says {spec.dtype}")
    num_blocks, block_size = pool_geometry(shape, spec, where)
    return flat.reshape(num_blocks * block_size, spec.nbytes(1)), num_blocks, block_size
