"""CUDA memory the way kvwire moves it: flat byte views, slices, copies, checksums.

A backend that takes device memory (UCX: cuda_copy, cuda_ipc, GPUDirect RDMA) sends and
receives CUDA tensors where they are; this module turns an engine's CUDA array (torch,
cupy, numba, anything with ``__cuda_array_interface__``) into a flat uint8 device array
that shares its memory, and checks frames on the GPU (kvwire.cuda.checksum), so only 8
bytes per 4 KiB of a frame ever reach host memory. numba is imported on first use.

Whether device memory is a GPU's or numba's simulator's (host memory posing as CUDA
memory: CI, no GPU) is decided once per process, by ``kvwire.cuda.memory``; the
primitives below hand over to that strategy.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from . import dtypes
from .cuda.memory import is_device, memory

__all__ = ["DeviceBytes", "adopt", "as_device_array", "copy", "device_bytes", "empty", "frame_blocksum",
           "is_device", "join", "launching", "simulated", "synchronize", "to_host"]


class DeviceBytes(NamedTuple):
    """A kernel's output on the device, with the shape and layout dtype it stands for."""

    flat: object  # flat uint8 device array
    shape: tuple[int, ...]
    dtype: str


def simulated() -> bool:
    """Whether numba's CUDA simulator stands in for a GPU (NUMBA_ENABLE_CUDASIM=1); False
    without numba (an optional dependency: the ``cuda`` extra)."""
    return memory().simulated


def device_bytes(obj, *, writable: bool = False):
    """(flat uint8 device array sharing ``obj``'s memory, logical shape, layout dtype name).

    A non-contiguous torch source is copied on the device first; a non-contiguous
    destination (``writable``) is refused, since bytes written into a copy would never
    reach it. Other non-contiguous CUDA arrays are refused.
    """
    if type(obj).__module__.startswith("torch"):
        import torch

        shape, name = tuple(obj.shape), dtypes.name_of_torch(obj.dtype)
        tensor = obj.detach()
        if not tensor.is_contiguous():
            if writable:
                raise ValueError("destination CUDA tensor must be contiguous")
            tensor = tensor.contiguous()
        flat = tensor.reshape(-1).view(torch.uint8)  # numba cannot import bfloat16 tensors directly
        return as_device_array(flat), shape, name
    array = as_device_array(obj)
    if not array.flags["C_CONTIGUOUS"]:
        raise ValueError("CUDA array must be C-contiguous (torch tensors are made contiguous on the device)")
    shape, name = tuple(array.shape), dtypes.name_of_numpy(np.dtype(array.dtype))
    flat = array.reshape(array.size)
    if flat.dtype != np.uint8:
        flat = flat.view(np.uint8)
    return flat, shape, name


def as_device_array(obj):
    """A numba device array sharing ``obj``'s memory (a HostCudaArray in the simulator)."""
    return memory().as_device_array(obj)


def synchronize() -> None:
    """Wait for kvwire's copies and kernels on the device (numba's default stream): before
    a landing buffer is reused, and before a layer is handed to the engine as ready."""
    memory().synchronize()


def launching():
    """Held around every kernel launch (a lock in the simulator, nothing on a GPU)."""
    return memory().launching()


def adopt(output):
    """A kernel's output array as flat device bytes kvwire can send (in the simulator, a
    HostCudaArray copy of numba's fake device array, which UCX cannot address)."""
    output = memory().adopt(output)
    flat = output.reshape(output.size)
    return flat if flat.dtype == np.uint8 else flat.view(np.uint8)


def empty(nbytes: int):
    """A new flat uint8 device array."""
    return memory().empty(nbytes)


def copy(dst, src) -> None:
    """``dst[:] = src`` for any pair of flat, contiguous host and device byte arrays of one length."""
    if isinstance(src, (bytes, memoryview)):
        src = np.frombuffer(src, dtype=np.uint8)
    memory().copy(dst, src)


def to_host(src) -> np.ndarray:
    """A host copy of a flat device byte array."""
    return memory().to_host(src)


def join(pieces: list, nbytes: int):
    """One device array holding ``pieces`` (device arrays, or the few host alignment pads)
    back to back; the piece itself when there is one."""
    if len(pieces) == 1 and is_device(pieces[0]):
        return pieces[0]
    out = empty(nbytes)
    position = 0
    for piece in pieces:
        size = len(piece) if is_device(piece) else memoryview(piece).nbytes
        copy(out[position : position + size], piece)
        position += size
    return out


def frame_blocksum(rid: int, layer: int, chunk: int, payload, *, kernel: bool | None = None) -> int:
    """The blocksum checksum of a device frame, computed on the GPU.

    In the simulator the kernel runs each 4 KiB block's 256 threads in Python (~0.5 s a
    block), so by default the checksum's CPU definition stands in there (the kernel is
    held to it by tests/test_blocksum.py); ``kernel=True`` runs the simulated kernel.
    """
    if kernel is None:
        kernel = memory().kernel_checksums
    if not kernel:
        from .wire.blocksum import frame_blocksum as on_cpu

        return on_cpu(rid, layer, chunk, [np.asarray(payload).view(np.ndarray)], len(payload))
    from .cuda.checksum import frame_blocksum as on_gpu

    with launching():
        return on_gpu(rid, layer, chunk, payload)
