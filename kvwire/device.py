"""CUDA memory the way kvwire moves it: flat byte views, slices, copies, checksums.

A backend that takes device memory (UCX: cuda_copy, cuda_ipc, GPUDirect RDMA) sends and
receives CUDA tensors where they are; this module turns an engine's CUDA array (torch,
cupy, numba, anything with ``__cuda_array_interface__``) into a flat uint8 device array
that shares its memory, and checks frames on the GPU (kvwire.cuda.checksum), so only 8
bytes per 4 KiB of a frame ever reach host memory. numba is imported on first use.

Under numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``: CI, no GPU) device memory is
host memory behind ``__cuda_array_interface__`` (kvwire.cuda.simulated.HostCudaArray):
the same kvwire code paths run, the kernels run in the simulator, and UCX moves the
bytes as host memory. Only the few primitives below differ between the two.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from typing import NamedTuple

import numpy as np

from . import dtypes


class DeviceBytes(NamedTuple):
    """A kernel's output on the device, with the shape and layout dtype it stands for."""

    flat: object  # flat uint8 device array
    shape: tuple[int, ...]
    dtype: str


_SIMULATOR_LOCK = threading.RLock()


def is_device(obj) -> bool:
    """Whether ``obj`` is CUDA memory (or, in the simulator, host memory posing as such)."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(obj, torch.Tensor):
        # Asked directly: torch raises KeyError, not AttributeError, from the
        # __cuda_array_interface__ of a dtype it cannot name there (float8), which
        # hasattr would let through. kvwire views torch tensors as bytes before use.
        return obj.device.type == "cuda"
    return hasattr(obj, "__cuda_array_interface__") and not isinstance(obj, (memoryview, bytes, bytearray))


def simulated() -> bool:
    """Whether numba's CUDA simulator stands in for a GPU (NUMBA_ENABLE_CUDASIM=1); False
    without numba (an optional dependency: the ``cuda`` extra)."""
    try:
        from numba import config
    except ImportError:
        return False
    return bool(config.ENABLE_CUDASIM)


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
    if simulated():
        from .cuda.simulated import HostCudaArray

        return np.asarray(obj).view(HostCudaArray)
    from .cuda.compat import cuda

    if type(obj).__module__.startswith("torch"):
        # torch's __cuda_array_interface__ names no stream, so numba cannot wait for the
        # kernels that produced (or still read) this memory; UCX and our kernels must not
        # touch it before they are done.
        import torch

        torch.cuda.current_stream(obj.device).synchronize()
    return cuda.as_cuda_array(obj)


def synchronize() -> None:
    """Wait for kvwire's copies and kernels on the device (numba's default stream): before
    a landing buffer is reused, and before a layer is handed to the engine as ready."""
    if not simulated():
        from .cuda.compat import cuda

        cuda.synchronize()


def launching():
    """Held around every kernel launch: the simulator swaps the kernels module's ``cuda``
    global while a kernel runs, so two threads launching at once (a sender and a receiver
    in one process) would find it half-replaced. Real CUDA needs no lock."""
    return _SIMULATOR_LOCK if simulated() else contextlib.nullcontext()


def adopt(output):
    """A kernel's output array as flat device bytes kvwire can send (in the simulator, a
    HostCudaArray copy of numba's fake device array, which UCX cannot address)."""
    if simulated():
        from .cuda.simulated import host_cuda

        output = host_cuda(output.copy_to_host())
    flat = output.reshape(output.size)
    return flat if flat.dtype == np.uint8 else flat.view(np.uint8)


def empty(nbytes: int):
    """A new flat uint8 device array."""
    if simulated():
        from .cuda.simulated import host_cuda

        return host_cuda(np.empty(nbytes, dtype=np.uint8))
    from .cuda.compat import cuda

    return cuda.device_array(nbytes, dtype=np.uint8)


def copy(dst, src) -> None:
    """``dst[:] = src`` for any pair of flat, contiguous host and device byte arrays of one length."""
    if isinstance(src, (bytes, memoryview)):
        src = np.frombuffer(src, dtype=np.uint8)
    if not (is_device(dst) or is_device(src)) or simulated():  # host to host needs no numba
        np.asarray(dst)[...] = src
        return
    if is_device(dst) and is_device(src):
        dst_array, src_array = as_device_array(dst), as_device_array(src)  # (imports numba.cuda safely)
        from numba.cuda.cudadrv import driver

        # Straight to cuMemcpyDtoD: numba's copy_to_device first re-derives both arrays'
        # extents and contiguity in Python, per call.
        if dst_array.nbytes != src_array.nbytes:
            raise ValueError(f"device copy of {src_array.nbytes} bytes into {dst_array.nbytes}")
        if not (dst_array.is_c_contiguous() and src_array.is_c_contiguous()):
            raise ValueError("device copy between non-contiguous arrays (it copies one flat range of bytes)")
        if dst_array.nbytes:
            driver.device_to_device(dst_array, src_array, dst_array.nbytes)
    elif is_device(dst):
        as_device_array(dst).copy_to_device(np.ascontiguousarray(src))
    else:
        as_device_array(src).copy_to_host(dst)


def to_host(src) -> np.ndarray:
    """A host copy of a flat device byte array."""
    if simulated():
        return np.array(np.asarray(src).view(np.ndarray), copy=True)
    return as_device_array(src).copy_to_host()


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
        kernel = not simulated()
    if not kernel:
        from .wire.blocksum import frame_blocksum as on_cpu

        return on_cpu(rid, layer, chunk, [np.asarray(payload).view(np.ndarray)], len(payload))
    from .cuda.checksum import frame_blocksum as on_gpu

    with launching():
        return on_gpu(rid, layer, chunk, payload)
