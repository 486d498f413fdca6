"""GPU kernels (pack/unpack of paged blocks, KV quantization) with a CPU path of identical results.

Nothing here is imported by the transport core: it stays usable without numba or a GPU.
"""
