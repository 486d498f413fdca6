"""Device memory, one strategy per process: real CUDA, or numba's simulator with host memory.

Under numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``: CI, no GPU) device memory is
host memory behind ``__cuda_array_interface__`` (``kvwire.cuda.simulated.HostCudaArray``):
the same kvwire code paths run, the kernels run in the simulator, and UCX moves the bytes
as host memory. The few primitives that differ are the two classes below; ``memory()``
picks one the first time it is asked (numba reads the simulator's switch once, when it is
imported) and every later use takes that one. numba is imported on first use.
"""

from __future__ import annotations

import contextlib
import sys
import threading

import numpy as np

from .simulated import HostCudaArray, host_cuda


def is_device(obj) -> bool:
    """Whether ``obj`` is CUDA memory (or, in the simulator, host memory posing as such)."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(obj, torch.Tensor):
        # Asked directly: torch raises KeyError, not AttributeError, from the
        # __cuda_array_interface__ of a dtype it cannot name there (float8), which
        # hasattr would let through. kvwire views torch tensors as bytes before use.
        return obj.device.type == "cuda"
    return hasattr(obj, "__cuda_array_interface__") and not isinstance(obj, (memoryview, bytes, bytearray))


class CudaMemory:
    """A GPU: numba device arrays, the driver's copies, kernels launched as they come."""

    simulated = False
    kernel_checksums = True  # frames of device memory are checked by the blocksum kernel

    def as_device_array(self, obj):
        """A numba device array sharing ``obj``'s memory."""
        from .compat import cuda

        if type(obj).__module__.startswith("torch"):
            # torch's __cuda_array_interface__ names no stream, so numba cannot wait for the
            # kernels that produced (or still read) this memory; UCX and our kernels must not
            # touch it before they are done.
            import torch

            torch.cuda.current_stream(obj.device).synchronize()
        return cuda.as_cuda_array(obj)

    def synchronize(self) -> None:
        from .compat import cuda

        cuda.synchronize()

    def launching(self):
        return contextlib.nullcontext()  # real CUDA needs no lock around a launch

    def adopt(self, output):
        return output

    def empty(self, nbytes: int):
        from .compat import cuda

        return cuda.device_array(nbytes, dtype=np.uint8)

    def copy(self, dst, src) -> None:
        if not (is_device(dst) or is_device(src)):  # host to host needs no numba
            np.asarray(dst)[...] = src
            return
        if is_device(dst) and is_device(src):
            dst_array, src_array = self.as_device_array(dst), self.as_device_array(src)  # (imports numba.cuda safely)
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
            self.as_device_array(dst).copy_to_device(np.ascontiguousarray(src))
        else:
            self.as_device_array(src).copy_to_host(dst)

    def to_host(self, src) -> np.ndarray:
        return self.as_device_array(src).copy_to_host()


class SimulatedMemory:
    """numba's simulator: "device" arrays are host arrays (HostCudaArray) that UCX and the
    simulated kernels address like CUDA memory."""

    simulated = True
    # the simulator runs each 4 KiB block's 256 threads in Python (~0.5 s a block): the
    # checksum's CPU definition stands in (the kernel is held to it by tests/test_blocksum.py)
    kernel_checksums = False

    def __init__(self):
        # The simulator swaps the kernels module's ``cuda`` global while a kernel runs, so
        # two threads launching at once (a sender and a receiver in one process) would find
        # it half-replaced.
        self._lock = threading.RLock()

    def as_device_array(self, obj):
        return np.asarray(obj).view(HostCudaArray)

    def synchronize(self) -> None:
        pass

    def launching(self):
        return self._lock

    def adopt(self, output):
        return host_cuda(output.copy_to_host())  # numba's fake device array: UCX cannot address it

    def empty(self, nbytes: int):
        return host_cuda(np.empty(nbytes, dtype=np.uint8))

    def copy(self, dst, src) -> None:
        np.asarray(dst)[...] = src

    def to_host(self, src) -> np.ndarray:
        return np.array(np.asarray(src).view(np.ndarray), copy=True)


_chosen: CudaMemory | SimulatedMemory | None = None
_choosing = threading.Lock()


def memory() -> CudaMemory | SimulatedMemory:
    """This process's device-memory strategy, chosen on first use: the simulator where
    numba runs it (``NUMBA_ENABLE_CUDASIM=1``), else real CUDA (which needs numba, the
    ``cuda`` extra, once device memory is actually used)."""
    global _chosen
    if _chosen is None:
        with _choosing:
            if _chosen is None:
                _chosen = SimulatedMemory() if _simulator_on() else CudaMemory()
    return _chosen


def _simulator_on() -> bool:
    try:
        from numba import config
    except ImportError:
        return False
    return bool(config.ENABLE_CUDASIM)
