"""GPU kernels (pack/unpack of paged blocks, KV quantization) with a CPU path of identical results.

The transport core imports only ``memory`` (the device-memory strategy, numba on first
use) and ``simulated``: it stays usable without numba or a GPU.
"""
