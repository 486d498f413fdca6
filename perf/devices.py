"""Where the GPU benchmarks (gpu_ucx, gpu_kv, gpu_codec) run here, whether they can, and
the receiver process they measure against.

With no CUDA GPU, gpu_ucx and gpu_kv are skipped ("no GPU"); ``perf`` then runs their
``DRY_RUN_ARGS`` (the same code with host memory, ``--device cpu``), so CI's smoke keeps
them working between the rare sessions that have a GPU, and reports the dry run beside
the skip, never as a measurement.
"""

from __future__ import annotations

import contextlib
import importlib.util
import subprocess


def cuda_available() -> bool:
    """Whether torch sees a CUDA GPU (False without torch)."""
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return torch.cuda.is_available()


DRY_RUN_NOTE = "a dry run in host memory (--device cpu): checks the code works, not a GPU measurement"


def gpu_missing() -> str | None:
    """Why a GPU benchmark measures nothing here, or None."""
    return None if cuda_available() else "no GPU (torch sees no CUDA device)"


def default_device() -> str:
    return "cuda" if cuda_available() else "cpu"


def synchronize(device: str) -> None:
    """Wait for the GPU's queued work (nothing to wait for on the CPU)."""
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def ucx_missing() -> str | None:
    """Why the UCX benchmarks cannot run here, or None."""
    from kvwire.transport.ucx import ucx_available

    return None if ucx_available() else "ucxx is not installed (pip install kvwire[ucx])"


@contextlib.contextmanager
def receiver_process(command: list[str], **popen):
    """The receiving side as a child process, killed on the way out unless it has exited:
    a sender side that failed must not leave it waiting forever."""
    child = subprocess.Popen(command, text=True, **popen)
    try:
        yield child
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()
