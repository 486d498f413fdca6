"""The blocksum frame checksum on the GPU (definition: kvwire.wire.blocksum).

One CUDA block of ``THREADS`` threads digests one 4 KiB block of the payload: each
thread multiplies its words by their multipliers, the block adds the products up in
shared memory (uint64, wrapping mod 2**64 like the CPU path). Only the digests, 8 bytes
per 4 KiB, are copied to host, where they are combined with the frame header.
"""

from __future__ import annotations

import warnings

import numpy as np
from numba import config, uint64

from ..wire.blocksum import BLOCK_BYTES, BLOCK_WORDS, MULTIPLIERS, combine, num_blocks
from .compat import cuda

THREADS = 256

if config.ENABLE_CUDASIM:  # the simulator's numpy scalars warn where the GPU wraps mod 2**64, as the checksum means to
    warnings.filterwarnings("ignore", "overflow encountered in scalar", RuntimeWarning, __name__)


@cuda.jit
def block_digests_kernel(payload, nbytes, multipliers, digests):
    """payload: uint8[:] (device), digests: uint64[num_blocks] (device)."""
    partial = cuda.shared.array(THREADS, dtype=uint64)
    block = cuda.blockIdx.x
    tid = cuda.threadIdx.x
    acc = uint64(0)
    base = block * BLOCK_BYTES
    for i in range(tid, BLOCK_WORDS, THREADS):
        start = base + 4 * i
        word = uint64(0)
        for b in range(4):
            if start + b < nbytes:
                word |= uint64(payload[start + b]) << uint64(8 * b)
        acc += word * multipliers[i]
    partial[tid] = acc
    cuda.syncthreads()
    stride = THREADS // 2
    while stride > 0:
        if tid < stride:
            partial[tid] += partial[tid + stride]
        cuda.syncthreads()
        stride //= 2
    if tid == 0:
        digests[block] = partial[0]


_multipliers_on_device = None


def _multipliers():
    global _multipliers_on_device
    if _multipliers_on_device is None:
        _multipliers_on_device = cuda.to_device(MULTIPLIERS)
    return _multipliers_on_device


def block_digests(payload) -> np.ndarray:
    """The digests (host uint64 array) of a contiguous uint8 device payload.

    ``payload``: a numba device array, anything with ``__cuda_array_interface__`` (torch
    CUDA uint8 views, cupy), or a numpy array under numba's CUDA simulator.
    """
    nbytes = payload.shape[0]
    blocks = num_blocks(nbytes)
    digests = cuda.device_array(max(blocks, 1), dtype=np.uint64)
    if blocks:
        block_digests_kernel[blocks, THREADS](payload, nbytes, _multipliers(), digests)
    return digests.copy_to_host()[:blocks]


def frame_blocksum(rid: int, layer: int, chunk: int, payload) -> int:
    """The frame checksum of a device payload; equals kvwire.wire.blocksum.frame_blocksum."""
    return combine(rid, layer, chunk, payload.shape[0], block_digests(payload))
