"""The CUDA kernels give the CPU path's bytes exactly, on numba's CUDA simulator (CI) and
on a real GPU (perf/gpu_check.sh runs this file there); every kernel compiles to PTX for
sm_80 and sm_90."""

import os
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest

from kvwire.codecs import float32_to_bits, get_codec

from .support import ROOT

from kvwire.cuda import ops  # noqa: E402  (after the simulator switch)
from kvwire.cuda.compat import cuda  # noqa: E402

if os.environ.get("NUMBA_ENABLE_CUDASIM") != "1" and not cuda.is_available():
    pytest.skip("kernel tests need numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1) or a GPU", allow_module_level=True)


def dev(array: np.ndarray):
    """``array`` in device memory (the simulator's stands in for it in CI)."""
    return cuda.to_device(np.ascontiguousarray(array))


def host(array) -> np.ndarray:
    return array.copy_to_host()

NB, BS, H, D = 6, 4, 2, 16
RNG = np.random.default_rng(1)


def pool_and_rows(dtype, tokens=10, block_ids=(4, 1, 3)):
    values = (RNG.standard_normal((NB, BS, H, D)) * 3).astype(np.float32)
    values[0, 0, 0, :4] = [0.0, -0.0, 1e-30, -2.5e-3]  # zeros and (for bf16/f16) subnormal territory
    pool = values.astype({"bfloat16": ml_dtypes.bfloat16, "float16": np.float16, "float32": np.float32}[dtype])
    ids = np.array(block_ids, np.int64)
    rows = (ids[:, None] * BS + np.arange(BS)).reshape(-1)[:tokens]
    return pool, rows


def device_view(pool, dtype):
    element = np.float32 if dtype == "float32" else np.uint16
    return pool.view(element).reshape(NB * BS, H * D)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("codec", ["fp8", "int8", "int4"])
def test_fused_kernels_match_the_cpu_path_bit_for_bit(codec, dtype):
    pool, rows = pool_and_rows(dtype)
    x = pool.astype(np.float32).reshape(NB * BS, H, D)[rows]
    cpu = get_codec(codec)
    ref_codes, ref_scales = cpu.encode(x)
    codes, scales = ops.gather_quantize(dev(device_view(pool, dtype)), dtype, dev(rows), codec, H, D, threads=32)
    assert host(codes).tobytes() == ref_codes.tobytes()
    assert host(scales).tobytes() == ref_scales.tobytes()

    out = dev(np.zeros((NB * BS, H * D), np.float32 if dtype == "float32" else np.uint16))
    dst_rows = (np.array([0, 5, 2])[:, None] * BS + np.arange(BS)).reshape(-1)[: len(rows)]
    ops.dequantize_scatter(codes, scales, codec, H, D, dev(dst_rows), out, dtype, threads=32)
    out = host(out)
    expected = float32_to_bits(cpu.decode([ref_codes, ref_scales], len(rows), H, D), dtype)
    assert out[dst_rows].tobytes() == expected.tobytes()
    untouched = np.setdiff1d(np.arange(NB * BS), dst_rows)
    assert not out[untouched].any()


def test_row_gather_and_scatter_are_bit_exact():
    pool, rows = pool_and_rows("bfloat16", tokens=11)
    as_bytes = pool.view(np.uint8).reshape(NB * BS, -1)
    gathered = host(ops.gather_rows(dev(as_bytes), dev(rows), threads=32))
    assert gathered.tobytes() == as_bytes[rows].tobytes()
    target = dev(np.zeros_like(as_bytes))
    ops.scatter_rows(dev(gathered), dev(rows[::-1]), target, threads=32)
    assert host(target)[rows[::-1]].tobytes() == gathered.tobytes()


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf_in_the_pool_is_refused(bad):
    pool, rows = pool_and_rows("float32")
    pool[1, 2, 1, 3] = bad  # block 1 is one of the request's blocks
    with pytest.raises(ValueError, match="NaN or Inf in the input; a lossy codec cannot scale it"):
        ops.gather_quantize(dev(device_view(pool, "float32")), "float32", dev(rows), "int8", H, D, threads=32)


def test_every_kernel_compiles_to_ptx_for_sm80_and_sm90():
    # On a numpy without np.row_stack, as numpy 2.5 is: numba-cuda registers an overload of
    # it when it loads for a GPU, and on a GPU machine with numpy 2.5.2 every device path of
    # kvwire failed to import until kvwire.cuda.compat restored the alias.
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="0", PYTHONPATH=ROOT)
    done = subprocess.run([sys.executable, "-m", "tests.programs.ptx_without_row_stack", "80", "90"],
                          capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "sm_80: 7 kernels compiled" in done.stdout
    assert "sm_90: 7 kernels compiled" in done.stdout


@pytest.mark.parametrize("nbytes", [1, 3, 4095, 4096, 4097, 3 * 4096 + 5])
def test_gpu_blocksum_equals_the_cpu_definition(nbytes):
    from kvwire.cuda import checksum
    from kvwire.wire import blocksum

    payload = RNG.integers(0, 256, nbytes, dtype=np.uint8)
    assert np.array_equal(checksum.block_digests(dev(payload)), blocksum.block_digests(payload))
    assert checksum.frame_blocksum(7, 2, 1, dev(payload)) == blocksum.frame_blocksum(7, 2, 1, [payload], nbytes)
