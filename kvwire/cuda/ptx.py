"""Compile every kvwire kernel to PTX for a given compute capability, with no GPU.

CI runs this for sm_80 and sm_90 so that a kernel that does not compile cannot land.
numba asks the current device for its compute capability when it compiles a device
function; with no device there is none, so for the duration of the compile we answer
with the capability being targeted.

    python -m kvwire.cuda.ptx 80 90
"""

from __future__ import annotations

import contextlib
import sys
from types import SimpleNamespace
from unittest import mock

from .compat import cuda

KERNEL_SIGNATURES = {
    "gather_quantize": [
        f"void({src}[:, :], int32, int64[:], int32, int64, int64, int64, int64, int64, uint8[:, :], float32[:], uint16[:], int32[:])"
        for src in ("float32", "uint16")
    ],
    "dequantize_scatter": [
        f"void(uint8[:, :], float32[:], uint16[:], int32, int64, int64, int64, int64, int64, int64[:], {dst}[:, :], int32)"
        for dst in ("float32", "uint16")
    ],
    "gather_rows": ["void(uint8[:, :], int64[:], uint8[:, :])"],
    "scatter_rows": ["void(uint8[:, :], int64[:], uint8[:, :])"],
    "checksum.block_digests_kernel": ["void(uint8[:], int64, uint64[:], uint64[:])"],
}


@contextlib.contextmanager
def _targeting(cc: tuple[int, int]):
    device = SimpleNamespace(compute_capability=cc)
    with mock.patch("numba.cuda.dispatcher.get_current_device", return_value=device):
        yield


def compile_all(cc: tuple[int, int]) -> dict[str, int]:
    """PTX size in characters of each kernel/signature, compiled for ``cc``."""
    import importlib

    sizes = {}
    with _targeting(cc):
        for name, signatures in KERNEL_SIGNATURES.items():
            module, _, function = name.rpartition(".")
            kernel = getattr(importlib.import_module(f"kvwire.cuda.{module or 'kernels'}"), function)
            for signature in signatures:
                ptx, _ = cuda.compile_ptx(kernel.py_func, signature, cc=cc)
                if f".target sm_{cc[0]}{cc[1]}" not in ptx:
                    raise RuntimeError(f"{name}: PTX does not target sm_{cc[0]}{cc[1]}")
                sizes[f"{name}{signature[4:]}"] = len(ptx)
    return sizes


def main(argv: list[str]) -> int:
    for arch in argv or ["80", "90"]:
        cc = (int(arch[:-1]), int(arch[-1]))
        sizes = compile_all(cc)
        print(f"sm_{arch}: {len(sizes)} kernels compiled, {sum(sizes.values())} characters of PTX")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
