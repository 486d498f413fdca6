"""Layers of many plain numpy arrays, checked and moved at C speed on both ends.

Thousands of small tensors per layer are common (65,536 tensors of 1 KiB in one request
is a benchmark case). Checked one by one in Python, each costs microseconds on both
ends: more than its bytes take on the wire. Here every check over a whole layer runs in
C (``map`` with ``attrgetter``, list compares) and the bytes move as buffers: the sender
joins them in one copy, the receiver lands them in flat byte views made once, when the
engine called ``expect``. Anything unusual (padding between tensors, dtypes numpy does not
export as a buffer, a non-contiguous or read-only array, an engine buffer larger than
the request) takes the general path, which also words the precise error.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Mapping
from typing import NamedTuple

import numpy as np

from . import native
from .buffers import ReusedBuffers
from .dtypes import ITEMSIZE, exportable, numpy_dtype
from .layout import LayerPlan

# numpy dtype -> layout name, and the dtypes numpy can export as a buffer as they are
NUMPY_NAMES = {numpy_dtype(name): name for name in ITEMSIZE if numpy_dtype(name).name == name}
BUFFER_DTYPES = {dtype for dtype in NUMPY_NAMES if exportable(np.empty(0, dtype)).dtype == dtype}

MANY_TENSORS = 8  # a layer of more tensors than this is worth checking whole (fewer: tensor by tensor is as quick)

_shape_of = operator.attrgetter("shape")
_dtype_of = operator.attrgetter("dtype")


class UniformPlan(NamedTuple):
    """A layer plan whose tensors sit back to back with no padding, in buffer dtypes."""

    names: list[str]
    shapes: list[tuple[int, ...]]
    dtypes: list[np.dtype]
    offsets: list[int]


def _per_plan(cache: dict, plan: LayerPlan, make):
    """``make(plan)``, remembered by ``id(plan)`` (hashing a plan would walk every slot; the
    plan is kept beside it, so a new plan at a reused id is not taken for the old one)."""
    cached = cache.get(id(plan))
    if cached is not None and cached[0] is plan:
        return cached[1]
    made = make(plan)
    if len(cache) > 256:
        cache.clear()
    cache[id(plan)] = (plan, made)
    return made


_PLANS: dict[int, tuple[LayerPlan, UniformPlan | None]] = {}
_ONE_KIND: dict[int, tuple[LayerPlan, tuple | None]] = {}


def uniform_plan(plan: LayerPlan) -> UniformPlan | None:
    """``plan`` as a ``UniformPlan``, or None if some tensor is padded or not a buffer dtype."""
    return _per_plan(_PLANS, plan, _make_uniform_plan)


def _make_uniform_plan(plan: LayerPlan) -> UniformPlan | None:
    offsets = [slot.offset for slot in plan.slots]
    ends = list(itertools.accumulate(slot.nbytes for slot in plan.slots))
    dtype_names = [slot.spec.dtype for slot in plan.slots]
    dtypes = {name: numpy_dtype(name) for name in set(dtype_names)}
    uniform = None
    if offsets[1:] == ends[:-1] and (not offsets or offsets[0] == 0) and set(dtypes.values()) <= BUFFER_DTYPES:
        uniform = UniformPlan([slot.name for slot in plan.slots], [slot.shape for slot in plan.slots],
                              list(map(dtypes.__getitem__, dtype_names)), offsets)
    return uniform


def join(plan: LayerPlan, tensors: Mapping[str, object], buffers: ReusedBuffers | None = None) -> np.ndarray | None:
    """The sender's side: the layer's byte stream in one buffer (one copy; from ``buffers``
    if given), if ``tensors`` are C-contiguous numpy arrays of exactly the plan's shapes and
    dtypes with no padding; else None. Each is checked and copied in C where
    ``kvwire.native`` is compiled."""
    ordered = _in_plan_order(plan, tensors)
    if ordered is None:
        return None
    uniform, arrays = ordered
    joined = np.empty(plan.nbytes, dtype=np.uint8) if buffers is None else buffers.get(plan.nbytes)
    return joined if native.gather(arrays, uniform.dtypes, uniform.shapes, joined) else None


def plain_arrays(plan: LayerPlan, tensors: Mapping[str, object]) -> list[np.ndarray] | None:
    """The sender's side where connections write many buffers at once (``join``'s twin
    without the copy): ``tensors`` in the plan's order, if they are C-contiguous numpy
    arrays of exactly the plan's shapes and dtypes with no padding; else None."""
    ordered = _in_plan_order(plan, tensors)
    if ordered is None:
        return None
    uniform, arrays = ordered
    return arrays if native.gather(arrays, uniform.dtypes, uniform.shapes, None) else None


def _in_plan_order(plan: LayerPlan, tensors: Mapping[str, object]) -> tuple[UniformPlan, list] | None:
    """``plan`` as a ``UniformPlan`` and ``tensors`` in its order, if it is one and they are
    exactly its names (not yet checked as arrays); else None."""
    uniform = uniform_plan(plan)
    if uniform is None or len(tensors) != len(uniform.names):
        return None
    try:
        return uniform, list(map(tensors.__getitem__, uniform.names))
    except KeyError:
        return None


def _one_kind(plan: LayerPlan) -> tuple[list[str], np.dtype, tuple[int, ...]] | None:
    """(names, dtype, shape) if every tensor of ``plan`` has that one dtype and non-empty
    shape and they sit back to back; else None."""
    return _per_plan(_ONE_KIND, plan, _make_one_kind)


def _make_one_kind(plan: LayerPlan) -> tuple[list[str], np.dtype, tuple[int, ...]] | None:
    first = plan.slots[0]
    kind = None
    if first.shape and first.nbytes and all(
        slot.spec.dtype == first.spec.dtype and slot.shape == first.shape and slot.offset == i * first.nbytes
        for i, slot in enumerate(plan.slots)
    ):
        kind = ([slot.name for slot in plan.slots], numpy_dtype(first.spec.dtype), first.shape)
    return kind


def split(plan: LayerPlan, storage: np.ndarray) -> dict[str, np.ndarray] | None:
    """The receiver's side, for a layer held in its own ``storage`` (its byte stream): the
    tensors as arrays viewing it, cut by one reshape where all are of one kind (thousands of
    blocks of one shape, the common case: ~0.2 us a tensor, against ~2.5 us sliced, viewed
    and reshaped one by one); else None."""
    kind = _one_kind(plan)
    if kind is None:
        return None
    names, dtype, shape = kind
    blocks = storage[: plan.nbytes].view(dtype).reshape(len(names), *shape)
    return dict(zip(names, blocks))


class HostLayer(NamedTuple):
    """An ``expect()`` layer whose every buffer is a writable, contiguous, non-empty numpy
    array of a buffer dtype: its names (the layout's order), arrays and flat byte views."""

    names: list[str]
    arrays: list[np.ndarray]
    views: list[np.ndarray]


def describe_host_layer(names: list[str], tensors: Mapping[str, object]) -> HostLayer | None:
    """The receiver's side, when the engine calls ``expect``: ``tensors`` (all of a layer's,
    named ``names`` in the layout's order) as a ``HostLayer``, or None if one is not plain
    (or the layer has at most ``MANY_TENSORS``)."""
    if len(tensors) != len(names) or len(names) <= MANY_TENSORS:
        return None
    try:
        arrays = list(map(tensors.__getitem__, names))
    except KeyError:
        return None
    # numpy views, not memoryviews: those are objects the garbage collector tracks, and
    # holding tens of thousands of them made every collection meanwhile walk them all.
    # (None if one is not a plain, writable, non-empty array: an empty tensor has no bytes to land)
    views = native.byte_views(arrays)
    if views is None or not set(map(_dtype_of, arrays)) <= BUFFER_DTYPES:
        return None
    return HostLayer(names, arrays, views)


def landing_plan(host: HostLayer, plan: LayerPlan) -> UniformPlan | None:
    """``plan`` as a ``UniformPlan`` if the request's layer fills ``host``'s buffers exactly,
    in the plan's order and dtypes with no padding (its bytes can land in ``host.views`` as
    they are, at its offsets); else None."""
    uniform = uniform_plan(plan)
    if (
        uniform is not None
        and host.names == uniform.names
        and list(map(_shape_of, host.arrays)) == uniform.shapes
        and list(map(_dtype_of, host.arrays)) == uniform.dtypes
    ):
        return uniform
    return None
