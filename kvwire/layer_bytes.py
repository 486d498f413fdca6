"""A request's bytes on the sending side: the tensors of each layer the engine handed
over, borrowed until the request is confirmed, and cut into frames for the writers.

A layer is a byte stream of its tensors in sorted-name order, each 64-byte aligned; it
travels in chunks of ``chunk_bytes``. Nothing is copied, except that a layer made of
many small tensors is joined into one buffer once where the connections would walk them
one by one (UCX, TLS); plain TCP writes and hashes them where they are, in C. Plain numpy
arrays (what engines hand over) are checked in one tight pass; anything else takes the
checked path, which also words what does not fit.
"""

from __future__ import annotations

from typing import Mapping, NamedTuple

import numpy as np

from . import device, uniform
from .arrays import as_bytes
from .buffers import ReusedBuffers
from .dtypes import accepts, exportable, numpy_dtype
from .layout import ALIGN_BYTES
from .protocol import RequestPlan, SegmentMap
from .wire import framing
from .wire.checksum import frame_checksum, layers_checksum
from .wire.messages import Data, Layers

_PAD = memoryview(bytes(ALIGN_BYTES))
# Layers up to this size, sent whole, share frames (``Layers``) when a writer finds several
# of one request queued together: one header, checksum, receive and bookkeeping for all.
JOIN_LAYER_BYTES = 256 << 10
_RELEASED = ([], SegmentMap(()), None)  # a layer's entry once the request is confirmed
_SMALL_PIECE_BYTES = 64 * 1024


def check_names(layout, request_id: str, layer: int, tensors: Mapping[str, object]) -> None:
    names = layout.layers[layer].keys()
    if tensors.keys() != names:
        raise ValueError(
            f"request {request_id!r} layer {layer}: missing tensors {sorted(names - tensors.keys())}, "
            f"unexpected tensors {sorted(tensors.keys() - names)}"
        )


class LayerBytes:
    """The byte stream of each layer the engine handed over, borrowed until the request is
    confirmed, and cut into Data frames for the sender's writers.

    Each tensor is described once, when its layer is taken: a buffer and whether it is
    device memory (``device_memory``: the connections take CUDA memory as it is; else a
    CUDA tensor is copied to host memory then).
    """

    def __init__(self, plan: RequestPlan, request_id: str, device_memory: bool, verify: bool = True,
                 join_buffers: ReusedBuffers | None = None, join_small_tensors: bool = True):
        self.plan = plan
        self.join_buffers = join_buffers  # where layers of many small tensors are joined (the Sender's)
        # False where every connection writes (and kvwire hashes) a list of thousands of
        # buffers at C speed (``Capabilities.writes_many_buffers``): a layer sent in one chunk
        # then goes out from the engine's arrays, with no join
        self.join_small_tensors = join_small_tensors
        self.request_id = request_id
        self.device_memory = device_memory
        self.verify = verify  # checksum each frame (else its algorithm is "none": see SenderOptions.verify)
        # per layer, once handed over: its segments [(start, length, buffer, on_device)] and
        # either the map from byte offsets to them (a layer cut in several chunks) or, for a
        # layer sent in one chunk, that chunk's (pieces, on_device), in one tuple (a writer
        # reads them at once)
        self._taken: list[tuple[list, SegmentMap | None, tuple | None] | None] = [None] * plan.num_layers

    def has(self, layer: int) -> bool:
        return self._taken[layer] is not None

    def take(self, layers: Mapping[int, Mapping[str, object]]) -> None:
        """Borrow the tensors of ``layers`` ({layer: tensors}); ValueError (naming the layer
        and tensor) on one that does not fit its plan, and then none is taken."""
        taken = []
        for layer, tensors in layers.items():
            arrays = self._arrays_as_they_are(layer, tensors)
            if arrays is not None:
                taken.append((layer, ([], None, (arrays, False))))
                continue
            segments = self._segments_of(layer, tensors)
            if self.plan.num_chunks[layer] == 1:  # its one chunk is all of it: no map needed
                whole = ([segment[2] for segment in segments], any(segment[3] for segment in segments))
                taken.append((layer, (segments, None, whole)))
            else:
                taken.append((layer, (segments, SegmentMap([(start, length) for start, length, _, _ in segments]),
                                      None)))
        for layer, entry in taken:
            self._taken[layer] = entry

    def release(self) -> None:
        """Stop borrowing the engine's arrays (the request is confirmed). A writer that took a
        chunk of a re-sent copy before the last ack came finds nothing to send (``frame``)."""
        self._taken = [_RELEASED] * len(self._taken)

    def _arrays_as_they_are(self, layer: int, tensors: Mapping[str, object]) -> list | None:
        """A one-chunk layer of many plain numpy arrays, checked, to go out unjoined (see
        ``join_small_tensors``); else None."""
        plan = self.plan.layers[layer]
        if self.join_small_tensors or len(plan.slots) <= uniform.MANY_TENSORS or self.plan.num_chunks[layer] != 1:
            return None
        return uniform.plain_arrays(plan, tensors)

    def _segments_of(self, layer: int, tensors: Mapping[str, object]) -> list[tuple[int, int, object, bool]]:
        plan = self.plan.layers[layer]
        if len(plan.slots) > uniform.MANY_TENSORS:
            joined = uniform.join(plan, tensors, self.join_buffers)
            if joined is not None:
                return [(0, plan.nbytes, joined, False)]
        segments = _plain_segments(plan, tensors)
        if segments is None:
            segments = self._checked_segments(layer, plan, tensors)
        if (
            len(segments) > 8
            and plan.nbytes < _SMALL_PIECE_BYTES * len(segments)
            and not any(segment[3] for segment in segments)
        ):
            # Many small tensors: one copy into a single buffer beats walking them per frame.
            return [(0, plan.nbytes, b"".join([segment[2] for segment in segments]), False)]
        return segments

    def _checked_segments(self, layer: int, plan, tensors: Mapping[str, object]) -> list[tuple[int, int, object, bool]]:
        """The segments of any tensors the layout takes (device memory, other array types,
        views to copy), each checked, with an error naming the first that does not fit."""
        if len(tensors) != len(plan.slots) or any(slot.name not in tensors for slot in plan.slots):
            check_names(self.plan.layout, self.request_id, layer, tensors)
        segments: list[tuple[int, int, object, bool]] = []
        position = 0
        for slot, plain in zip(plan.slots, _plain_slots(plan)):
            array = tensors[slot.name]
            shape, on_device = None, False
            if isinstance(array, device.DeviceBytes):  # gathered (and encoded) on the device
                buffer, shape, dtype = array
                on_device = True
            elif self.device_memory and device.is_device(array):
                buffer, shape, dtype = device.device_bytes(array)  # sent from where it is
                on_device = True
            else:
                buffer = _as_is(array, plain)  # a plain numpy array goes out as it is
                if buffer is None:
                    buffer, shape, dtype = as_bytes(array)
            if shape is not None and (shape != slot.shape or not accepts(slot.spec.dtype, dtype)):
                raise ValueError(
                    f"request {self.request_id!r} layer {layer} tensor {slot.name!r}: expected "
                    f"{slot.spec.dtype}{list(slot.shape)}, got {dtype}{list(shape)}"
                )
            if slot.offset > position:
                segments.append((position, slot.offset - position, _PAD[: slot.offset - position], False))
            if slot.nbytes:
                segments.append((slot.offset, slot.nbytes, buffer, on_device))
            position = slot.offset + slot.nbytes
        return segments

    def chunk(self, layer: int, chunk: int) -> tuple[list, int, bool] | None:
        """(buffers, total bytes, whether any is device memory) of one chunk of ``layer``;
        None once released."""
        taken = self._taken[layer]
        if taken is _RELEASED:
            return None
        segments, spans, whole = taken
        start, end = self.plan.chunk_span(layer, chunk)
        if whole is not None:
            return list(whole[0]), end - start, whole[1]
        pieces, on_device = [], False
        for i, lo, hi in spans.spans(start, end):
            _, seg_len, buffer, in_device = segments[i]
            on_device |= in_device
            if hi - lo == seg_len:
                pieces.append(buffer)
            elif in_device:
                pieces.append(buffer[lo:hi])
            else:
                pieces.append(memoryview(buffer).cast("B")[lo:hi])
        return pieces, end - start, on_device

    def joinable(self, layer: int) -> bool:
        """Whether ``layer`` may share a ``Layers`` frame with others: small, sent whole in
        one chunk, and in host memory."""
        whole = self._taken[layer][2]
        return whole is not None and not whole[1] and self.plan.layers[layer].nbytes <= JOIN_LAYER_BYTES

    def frame_layers(self, rid: int, layers: list[int]) -> list | None:
        """The buffers of one ``Layers`` frame carrying ``layers`` (each ``joinable``): its
        header, then their bytes in that order; None if the request was confirmed meanwhile."""
        pieces: list = []
        for layer in layers:
            whole = self._taken[layer][2]
            if whole is None:  # released (a whole layer was not: see joinable)
                return None
            pieces += whole[0]
        nbytes = sum(self.plan.layers[layer].nbytes for layer in layers)
        checksum, algorithm = 0, "none"
        if self.verify:
            checksum, algorithm = layers_checksum(rid, layers, pieces, nbytes), "xxh3"
        return [framing.encode(Layers(rid, layers, nbytes, checksum, algorithm)), *pieces]

    def frame(self, rid: int, layer: int, chunk: int, device_memory: bool) -> list | None:
        """The buffers of one Data frame: its header, then the chunk's bytes; None if the
        request was confirmed meanwhile. A chunk of CUDA memory is checksummed on the GPU
        (blocksum) and goes out from device memory, or, on a connection that cannot take it
        (``device_memory`` False: TCP after ``auto`` fell back), as a host copy."""
        cut = self.chunk(layer, chunk)
        if cut is None:
            return None
        pieces, nbytes, on_device = cut
        checksum, algorithm = 0, "none"
        if on_device:
            payload = device.join(pieces, nbytes)
            if self.verify:
                checksum, algorithm = device.frame_blocksum(rid, layer, chunk, payload), "blocksum"
            pieces = [payload if device_memory else device.to_host(payload)]
        elif self.verify:
            checksum, algorithm = frame_checksum(rid, layer, chunk, pieces, nbytes), "xxh3"
        return [framing.encode(Data(rid, layer, chunk, nbytes, checksum, algorithm)), *pieces]


class _PlainSlot(NamedTuple):
    """What a tensor must be to go out as it is: a C-contiguous numpy array of ``shape``
    and ``dtype``, sent as a view of ``export`` (a dtype the buffer protocol exports) if
    its own is not one."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    offset: int
    nbytes: int
    export: np.dtype | None


_PLAIN_SLOTS: dict[int, tuple[object, list[_PlainSlot]]] = {}  # by id(plan), as uniform.uniform_plan


def _plain_slots(plan) -> list[_PlainSlot]:
    cached = _PLAIN_SLOTS.get(id(plan))
    if cached is not None and cached[0] is plan:
        return cached[1]
    slots = []
    for slot in plan.slots:
        dtype = numpy_dtype(slot.spec.dtype)
        export = exportable(np.empty(0, dtype)).dtype
        slots.append(_PlainSlot(slot.name, slot.shape, dtype, slot.offset, slot.nbytes,
                                None if export == dtype else export))
    if len(_PLAIN_SLOTS) > 256:
        _PLAIN_SLOTS.clear()
    _PLAIN_SLOTS[id(plan)] = (plan, slots)
    return slots


def _plain_segments(plan, tensors: Mapping[str, object]) -> list[tuple[int, int, object, bool]] | None:
    """A layer's segments in one tight pass when every tensor is a C-contiguous numpy
    array of exactly its slot's shape and dtype (what engines hand over); None otherwise:
    the checked path then takes them, and words what is wrong."""
    if len(tensors) != len(plan.slots):
        return None
    segments, position = [], 0
    for plain in _plain_slots(plan):
        buffer = _as_is(tensors.get(plain.name), plain)
        if buffer is None:
            return None
        offset, nbytes = plain.offset, plain.nbytes
        if offset > position:
            segments.append((position, offset - position, _PAD[: offset - position], False))
        if nbytes:
            segments.append((offset, nbytes, buffer, False))
        position = offset + nbytes
    return segments


def _as_is(array, plain: _PlainSlot):
    """``array`` as the buffer it goes out as (itself, or a view the buffer protocol
    exports) if it is a C-contiguous numpy array of exactly ``plain``'s shape and dtype;
    else None."""
    if type(array) is not np.ndarray or array.dtype != plain.dtype or array.shape != plain.shape \
            or not array.flags.c_contiguous:
        return None
    return array if plain.export is None else array.view(plain.export)
