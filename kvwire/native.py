"""kvwire's compiled loops (``kvwire/_native.c``), or their Python twins where the
module was not built (no C compiler at install time): the same bytes either way, at
~0.1 us a tensor compiled against ~1 us in Python. ``COMPILED`` says which is in use."""

from __future__ import annotations

import collections
import itertools
import operator

import numpy as np

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
    that is not."""
    out = memoryview(destination).cast("B")
    position = 0
    for source, dtype, shape in zip(sources, dtypes, shapes):
        if not isinstance(dtype, np.dtype):
            raise TypeError(f"gather: {dtype!r} is not a numpy dtype")
        if (not isinstance(source, np.ndarray) or not source.flags.c_contiguous or source.dtype != dtype
                or source.shape != shape or source.nbytes > len(out) - position):
            return False
        out[position : position + source.nbytes] = source.reshape(-1).view(np.uint8)
        position += source.nbytes
    return True


def _bytes_view(buffer) -> memoryview:
    return memoryview(buffer).cast("B")


try:
    from ._native import gather, scatter

    COMPILED = True
except ImportError:  # pragma: no cover - built by every install that has a C compiler
    gather, scatter = gather_python, scatter_python
    COMPILED = False
