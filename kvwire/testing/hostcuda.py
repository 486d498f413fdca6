"""Host memory posing as CUDA memory, for tests of the device paths on a machine without a
GPU: the library's own simulator arrays (``kvwire.cuda.simulated``)."""

from ..cuda.simulated import HostCudaArray, host_cuda

__all__ = ["HostCudaArray", "host_cuda"]
