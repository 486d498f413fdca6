"""Where the GPU benchmarks (gpu_ucx, gpu_kv, gpu_codec) run here, and whether they can.

With no CUDA GPU, gpu_ucx and gpu_kv run the same code with host memory (``--device
cpu``): CI's smoke keeps them working between the rare sessions that have a GPU.
"""

from __future__ import annotations

import importlib.util


def cuda_available() -> bool:
    """Whether torch sees a CUDA GPU (False without torch)."""
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return torch.cuda.is_available()


def default_device() -> str:
    return "cuda" if cuda_available() else "cpu"


def ucx_missing() -> str | None:
    """Why the UCX benchmarks cannot run here, or None."""
    from kvwire.transport.ucx import ucx_available

    return None if ucx_available() else "ucxx is not installed (pip install kvwire[ucx])"
