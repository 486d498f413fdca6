"""Host-side launchers of the kernels: shapes, grids and the checks that must not run on
the GPU silently (NaN/Inf input, float16 scale overflow).

Arrays may be numba device arrays, anything exposing ``__cuda_array_interface__``
(torch CUDA tensors, cupy), or, under numba's CUDA simulator, plain numpy arrays.
bfloat16/float16 pools are passed as their uint16 bits.
"""

from __future__ import annotations

import numpy as np

from ..codecs import FP8_BLOCK_TOKENS, INT4_GROUP
from . import kernels
from .compat import cuda
from .memory import memory

KINDS = {"float32": kernels.KIND_F32, "bfloat16": kernels.KIND_BF16, "float16": kernels.KIND_F16}
CODEC_IDS = {"fp8": kernels.CODEC_FP8, "int8": kernels.CODEC_INT8, "int4": kernels.CODEC_INT4}


def _launch(kernel, blocks: int, threads: int, *args) -> None:
    """``kernel[blocks, threads](*args)``, one launch at a time under the simulator
    (kvwire.cuda.memory)."""
    with memory().launching():
        kernel[blocks, threads](*args)


def _num_groups(codec: str, tokens: int, heads: int, dim: int, group: int) -> int:
    if codec == "fp8":
        return -(-tokens // FP8_BLOCK_TOKENS) * heads
    if codec == "int8":
        return tokens * heads
    return tokens * heads * (dim // group)


def gather_quantize(pool2d, dtype: str, rows, codec: str, heads: int, dim: int, *, threads: int = kernels.THREADS):
    """Codes and scales of the tokens at pool rows ``rows`` (same layout as kvwire.codecs).

    Returns ``(codes, scales)``: codes uint8 ``(tokens, heads*dim)`` (int4: ``heads*dim/2``),
    scales float32 (fp8) or float16 bits as uint16 (int8, int4), flat.
    """
    tokens = len(rows)
    group = min(INT4_GROUP, dim)
    width = heads * dim // 2 if codec == "int4" else heads * dim
    codes = cuda.device_array((tokens, width), dtype=np.uint8)
    groups = _num_groups(codec, tokens, heads, dim, group)
    scales_f32 = cuda.device_array(max(1, groups if codec == "fp8" else 1), dtype=np.float32)
    scales_f16 = cuda.device_array(max(1, groups if codec != "fp8" else 1), dtype=np.uint16)
    error = cuda.to_device(np.zeros(1, dtype=np.int32))
    if groups:
        _launch(
            kernels.gather_quantize,
            groups,
            threads,
            pool2d,
            KINDS[dtype],
            rows,
            CODEC_IDS[codec],
            tokens,
            heads,
            dim,
            FP8_BLOCK_TOKENS,
            group,
            codes,
            scales_f32,
            scales_f16,
            error,
        )
    status = int(error.copy_to_host()[0])
    if status == 1:
        raise ValueError("NaN or Inf in the input; a lossy codec cannot scale it (use codec='none')")
    if status == 2:
        raise ValueError(f"values too large for a {codec} float16 scale")
    scales = scales_f32 if codec == "fp8" else scales_f16
    return codes, scales[:groups]


def dequantize_scatter(
    codes, scales, codec: str, heads: int, dim: int, rows, pool2d, dtype: str, *, threads: int = kernels.THREADS
):
    """Write ``code * scale`` of every element into pool rows ``rows`` in the pool's dtype."""
    tokens = len(rows)
    group = min(INT4_GROUP, dim)
    dummy_f32 = cuda.device_array(1, dtype=np.float32)
    dummy_f16 = cuda.device_array(1, dtype=np.uint16)
    scales_f32, scales_f16 = (scales, dummy_f16) if codec == "fp8" else (dummy_f32, scales)
    total = tokens * heads * dim
    if total:
        _launch(
            kernels.dequantize_scatter,
            -(-total // threads),
            threads,
            codes,
            scales_f32,
            scales_f16,
            CODEC_IDS[codec],
            tokens,
            heads,
            dim,
            FP8_BLOCK_TOKENS,
            group,
            rows,
            pool2d,
            KINDS[dtype],
        )


def gather_rows(pool_bytes2d, rows, *, threads: int = kernels.THREADS):
    """Contiguous copy (bytes) of the pool rows of a request: codec "none"."""
    out = cuda.device_array((len(rows), pool_bytes2d.shape[1]), dtype=np.uint8)
    total = out.shape[0] * out.shape[1]
    if total:
        _launch(kernels.gather_rows, -(-total // threads), threads, pool_bytes2d, rows, out)
    return out


def scatter_rows(contiguous_bytes2d, rows, pool_bytes2d, *, threads: int = kernels.THREADS):
    total = contiguous_bytes2d.shape[0] * contiguous_bytes2d.shape[1]
    if total:
        _launch(kernels.scatter_rows, -(-total // threads), threads, contiguous_bytes2d, rows, pool_bytes2d)


def to_device(array: np.ndarray):
    return cuda.to_device(np.ascontiguousarray(array))


def device_rows(pool, num_rows: int, dtype: str, *, encoded: bool):
    """A zero-copy device view of a CUDA pool as rows: element bits for the quantize
    kernels (float32, or uint16 for bf16/f16), raw bytes for the plain row copies."""
    if type(pool).__module__.startswith("torch"):
        import torch

        pool = pool.contiguous().view(torch.uint8)  # numba cannot import bfloat16 tensors directly
    array = memory().as_device_array(pool)
    array = array.reshape(array.size)
    if not array.dtype == np.uint8:
        array = array.view(np.uint8)
    if not encoded:
        return array.reshape(num_rows, -1)
    element = np.float32 if dtype == "float32" else np.uint16
    return array.view(element).reshape(num_rows, -1)
