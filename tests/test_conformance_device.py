"""The conformance suite once more with every tensor and engine buffer in CUDA memory, as
numba's simulator poses it (kvwire.testing.hostcuda): kvwire's device paths (no host
staging over UCX, blocksum frames, landing buffers, copies into CUDA buffers) under the
same bytes, errors, concurrency and kills. On a GPU, perf/gpu_check.sh runs the suite
with real CUDA tensors (KVWIRE_TEST_DEVICE=cuda)."""

import os
import subprocess
import sys

from .support import ROOT


def test_the_conformance_suite_passes_with_cuda_memory_under_the_simulator():
    env = dict(os.environ, KVWIRE_TEST_DEVICE="sim", NUMBA_ENABLE_CUDASIM="1")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-p",
            "no:warnings",
            "tests/test_conformance.py",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert " passed" in done.stdout, done.stdout[-500:]
