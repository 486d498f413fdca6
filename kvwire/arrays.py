"""Turning whatever array an engine holds into bytes kvwire can send, without copying.

Accepted: numpy arrays, torch tensors (CPU; CUDA ones are staged to host here, while a
UCX sender takes them as they are, see kvwire.device),
objects with ``__dlpack__``, and anything with the buffer protocol. bfloat16 and fp8
travel as their raw bits, so they round-trip exactly whatever library made them.
"""

from __future__ import annotations

import numpy as np

from . import device, dtypes


def _torch_bytes(tensor) -> tuple[np.ndarray, tuple[int, ...], str]:
    import torch

    name = dtypes.name_of_torch(tensor.dtype)
    shape = tuple(tensor.shape)
    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    tensor = tensor.contiguous().reshape(-1)
    return tensor.view(torch.uint8).numpy(), shape, name


def _numpy_bytes(array: np.ndarray) -> tuple[np.ndarray, tuple[int, ...], str]:
    if not array.flags.c_contiguous:
        array = np.ascontiguousarray(array)
    return array.reshape(-1).view(np.uint8), array.shape, dtypes.name_of_numpy(array.dtype)


def as_bytes(obj) -> tuple[np.ndarray, tuple[int, ...], str]:
    """(flat uint8 view of the data, logical shape, layout dtype name) of an array-like."""
    if type(obj) is np.ndarray:
        return _numpy_bytes(obj)
    if type(obj).__module__.startswith("torch"):
        return _torch_bytes(obj)
    if device.is_device(obj):  # cupy, numba: staged to host
        flat, shape, name = device.device_bytes(obj)
        return device.to_host(flat), shape, name
    if isinstance(obj, np.ndarray):
        return _numpy_bytes(obj)
    if hasattr(obj, "__dlpack__"):
        return _numpy_bytes(np.from_dlpack(obj))
    try:
        return _numpy_bytes(np.asarray(memoryview(obj)))
    except TypeError:
        raise ValueError(f"cannot read a {type(obj).__name__}: expected numpy, torch, DLPack or a buffer") from None


def writable_bytes(obj) -> tuple[np.ndarray, tuple[int, ...], str]:
    """Like ``as_bytes`` but for a destination: must be writable and already contiguous.
    CUDA arrays give a flat device byte array (kvwire.device)."""
    if device.is_device(obj):
        return device.device_bytes(obj, writable=True)
    if type(obj).__module__.startswith("torch"):
        if obj.device.type != "cpu":
            raise ValueError(f"destination tensor on {obj.device} is neither CPU nor CUDA memory")
        if not obj.is_contiguous():
            raise ValueError("destination tensor must be contiguous")
        return _torch_bytes(obj)
    array = obj if isinstance(obj, np.ndarray) else np.asarray(obj)
    if not array.flags.c_contiguous or not array.flags.writeable:
        raise ValueError("destination array must be C-contiguous and writable")
    return _numpy_bytes(array)
