"""dtype names shared by layouts, numpy, ml_dtypes and torch.

Layouts name dtypes as strings so that they travel on the wire and compare exactly.
numpy lacks bfloat16 and the fp8 types; ml_dtypes provides them where installed.
Without it, such arrays come back as views of the same-width unsigned integer type,
bit for bit, so nothing is lost (torch can reinterpret them with ``.view(dtype)``).
"""

from __future__ import annotations

import numpy as np

ITEMSIZE: dict[str, int] = {
    "float64": 8,
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "int64": 8,
    "int32": 4,
    "int16": 2,
    "int8": 1,
    "uint32": 4,
    "uint16": 2,
    "uint8": 1,
}
_EXTENSION_TYPES = ("bfloat16", "float8_e4m3fn", "float8_e5m2")
_SAME_WIDTH_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def _build_numpy_dtypes() -> dict[str, np.dtype]:
    table = {name: np.dtype(name) for name in ITEMSIZE if name not in _EXTENSION_TYPES}
    try:
        import ml_dtypes
    except ImportError:
        ml_dtypes = None
    for name in _EXTENSION_TYPES:
        if ml_dtypes is not None:
            table[name] = np.dtype(getattr(ml_dtypes, name))
        else:
            table[name] = np.dtype(_SAME_WIDTH_UINT[ITEMSIZE[name]])
    return table


_NUMPY = _build_numpy_dtypes()


def check_name(name: str) -> str:
    """Return ``name`` if kvwire knows it, else raise a ValueError listing the known names."""
    if name not in ITEMSIZE:
        raise ValueError(f"unknown dtype {name!r}; kvwire knows {sorted(ITEMSIZE)}")
    return name


def accepts(expected: str, found: str) -> bool:
    """Whether an array of dtype ``found`` may stand for layout dtype ``expected``.

    Exact names only, except that without ml_dtypes the same-width unsigned integer
    stands for bfloat16/fp8 (the raw bits), the form receivers hand such data back in.
    """
    return found == expected or (found == _NUMPY[expected].name and expected in _EXTENSION_TYPES)


def numpy_dtype(name: str) -> np.dtype:
    """The numpy dtype that receive buffers of this layout dtype are viewed as."""
    return _NUMPY[check_name(name)]


_NAMES: dict[np.dtype, str] = {}
_EXPORTABLE: dict[np.dtype, np.dtype] = {}


def name_of_numpy(dtype: np.dtype) -> str:
    """Layout name of a numpy dtype (ml_dtypes' names match torch's and the layout's).

    Cached: ``np.dtype.name`` is computed in Python and costs microseconds, which adds up
    over the thousands of small tensors of a paged layout.
    """
    name = _NAMES.get(dtype)
    if name is None:
        name = _NAMES[dtype] = dtype.name
    return name


def name_of_torch(dtype) -> str:
    """Layout name of a torch dtype: ``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def exportable(array: np.ndarray) -> np.ndarray:
    """``array`` itself, or a same-width unsigned view if its dtype (bfloat16, fp8) cannot
    be exported through the buffer protocol, which sockets and hashers read."""
    target = _EXPORTABLE.get(array.dtype)
    if target is None:
        try:
            memoryview(array[:0])
            target = array.dtype
        except (ValueError, TypeError):
            target = np.dtype(_SAME_WIDTH_UINT[array.dtype.itemsize])
        _EXPORTABLE[array.dtype] = target
    return array if target is array.dtype else array.view(target)
