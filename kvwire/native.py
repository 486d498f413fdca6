"""kvwire's compiled loops (``kvwire/_native.c``), or their Python twins where the
module was not built (no C compiler at install time): the same bytes either way, at
~0.1 us a tensor compiled against ~1 us in Python. ``COMPILED`` says which is in use.

``xxh3_pieces`` hashes a frame's pieces where they are with xxhash's own C functions
(found in the ``xxhash`` package's compiled module) where both are there (``XXH3_COMPILED``).
``send_pieces`` is None without the module: TCP then writes through Python's ``sendmsg``."""

from __future__ import annotations

import collections
import itertools
import operator

import numpy as np
import xxhash

_ALL = slice(None)


def scatter_python(source, destinations: list) -> int:
    """``kvwire._native.scatter`` in Python: consecutive bytes of ``source`` into each
    destination in turn; the bytes copied."""
    source = memoryview(source).cast("B")
    views = list(map(_bytes_view, destinations))
    ends = list(itertools.accumulate(map(len, views)))
    if ends and ends[-1] > len(source):
        short = next(i for i, end in enumerate(ends) if end > len(source))
        start = ends[short - 1] if short else 0
        raise ValueError(f"scatter: destination {short} needs {len(views[short])} bytes, the source has "
                         f"{len(source) - start} left")
    pieces = map(source.__getitem__, map(slice, [0, *ends[:-1]], ends))
    collections.deque(map(operator.setitem, views, itertools.repeat(_ALL), pieces), maxlen=0)
    return ends[-1] if ends else 0


def gather_python(sources: list, dtypes: list, shapes: list, destination) -> bool:
    """``kvwire._native.gather`` in Python: each source copied into ``destination`` in
    turn if it is a C-contiguous numpy array with its dtype and shape; False at the first
    that is not. ``destination`` None: only check them."""
    out = None if destination is None else memoryview(destination).cast("B")
    room = len(out) if out is not None else float("inf")
    position = 0
    for source, dtype, shape in zip(sources, dtypes, shapes):
        if not isinstance(dtype, np.dtype):
            raise TypeError(f"gather: {dtype!r} is not a numpy dtype")
        if (not isinstance(source, np.ndarray) or not source.flags.c_contiguous or source.dtype != dtype
                or source.shape != shape or source.nbytes > room - position):
            return False
        if out is not None:
            out[position : position + source.nbytes] = source.reshape(-1).view(np.uint8)
        position += source.nbytes
    return True


def byte_views_python(arrays: list) -> list | None:
    """``kvwire._native.byte_views`` in Python: a flat uint8 view of each array, or None if
    one is not exactly a numpy ndarray that is C-contiguous, writable and not empty."""
    if not all(type(array) is np.ndarray for array in arrays) or not all(
            array.flags.c_contiguous and array.flags.writeable and array.nbytes for array in arrays):
        return None
    return list(map(np.frombuffer, arrays, itertools.repeat(np.uint8)))


def xxh3_pieces_python(seed: int, pieces: list) -> int:
    """``kvwire._native.xxh3_pieces`` in Python: xxh3-64 of the pieces' bytes in turn."""
    hasher = xxhash.xxh3_64(seed=seed)
    for piece in pieces:
        hasher.update(piece)
    return hasher.intdigest()


def _bytes_view(buffer) -> memoryview:
    return memoryview(buffer).cast("B")


def _bind_xxh3(bind) -> bool:
    """Whether xxh3's C functions were found in the ``xxhash`` package's compiled module."""
    try:
        from xxhash import _xxhash
    except ImportError:  # pragma: no cover - every xxhash wheel has it
        return False
    path = getattr(_xxhash, "__file__", None)
    return bool(path) and bind(path)


try:
    from ._native import bind_xxh3, byte_views, gather, scatter, send_pieces
    from ._native import xxh3_pieces as _xxh3_pieces

    COMPILED = True
except ImportError:  # pragma: no cover - built by every install that has a C compiler
    gather, scatter, byte_views, send_pieces = gather_python, scatter_python, byte_views_python, None
    COMPILED = False

XXH3_COMPILED = COMPILED and _bind_xxh3(bind_xxh3)
xxh3_pieces = _xxh3_pieces if XXH3_COMPILED else xxh3_pieces_python
