"""Host memory posing as CUDA memory, for kvwire's device paths on a machine without a GPU.

Under numba's CUDA simulator there is no device memory; a HostCudaArray is a numpy array
that also exposes ``__cuda_array_interface__`` with its host address, so kvwire treats it
as an engine's CUDA tensor (no host staging, checksums by the simulated kernel) and UCX
moves it from its address like any buffer. Only under the simulator
(``kvwire.cuda.memory.SimulatedMemory``): real CUDA memory never takes this path. It lives beside the kernels, in the
library, so that the library never imports its testing package (``kvwire.testing.hostcuda``
re-exports it for tests).
"""

from __future__ import annotations

import numpy as np


class HostCudaArray(np.ndarray):
    """A numpy array that says it is CUDA memory."""

    @property
    def __cuda_array_interface__(self) -> dict:
        interface = self.__array_interface__
        return {
            "shape": interface["shape"],
            "typestr": interface["typestr"],
            "data": interface["data"],
            "strides": interface["strides"],
            "version": 3,
            "stream": None,
        }


def host_cuda(array) -> HostCudaArray:
    """A HostCudaArray view of (a contiguous copy of, if need be) ``array``."""
    return np.ascontiguousarray(array).view(HostCudaArray)
