"""Sender-side state of one request: the caller's arrays, chunked, and what was acked.

A layer is a byte stream of its tensors in sorted-name order, each 64-byte aligned;
it travels in chunks of ``chunk_bytes`` that stripe across the sender's connections.
Chunks borrow the caller's memory: nothing is copied, except that a layer made of many
small tensors is joined into one buffer once, so that no frame walks thousands of them.
"""

from __future__ import annotations

import operator
import threading
import time
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from . import device, paged
from .arrays import as_bytes
from .codecs import bits_to_float32, encodes, geometry
from .dtypes import ITEMSIZE, accepts, exportable, numpy_dtype
from .errors import KVWireError, PeerLostError, TransferAborted, TransferTimeout, again, remembered
from .layout import ALIGN_BYTES, LayerPlan
from .protocol import MONOTONIC, Clock, RequestPlan, SegmentMap

_PAD = memoryview(bytes(ALIGN_BYTES))
_SMALL_PIECE_BYTES = 64 * 1024
# numpy dtype -> layout name, and the dtypes numpy can export as a buffer as they are
_NUMPY_NAMES = {numpy_dtype(name): name for name in ITEMSIZE if numpy_dtype(name).name == name}
_BUFFER_DTYPES = {dtype for dtype in _NUMPY_NAMES if exportable(np.empty(0, dtype)).dtype == dtype}


@dataclass(frozen=True)
class TransferStats:
    """What one request moved: tensor bytes, payload bytes on the wire, codec, time."""

    raw_bytes: int
    wire_bytes: int
    codec: str
    layers: int
    seconds: float
    resent_bytes: int = 0  # wire bytes sent again after a dropped connection

    @property
    def goodput_gbps(self) -> float:
        return self.raw_bytes * 8 / max(self.seconds, 1e-9) / 1e9


class Transfer:
    """One request being sent, layer by layer. Made by ``Sender.open``."""

    def __init__(
        self,
        sender,
        request_id: str,
        rid: int,
        plan: RequestPlan,
        timeout_s: float,
        clock: Clock = MONOTONIC,
    ):
        self.request_id = request_id
        self.rid = rid
        self.plan = plan  # the receiver cuts the request by the same plan, rebuilt from the Open
        self.num_tokens = plan.num_tokens
        self.codec = plan.codec_name
        self.chunk_bytes = plan.chunk_bytes
        self._clock = clock
        self.opened_at = clock.now()
        self.deadline = self.opened_at + timeout_s
        self._sender = sender
        self._layout = plan.layout
        self._plans = self.plan.layers
        self._codec = self.plan.codec
        self.num_layers = self.plan.num_layers
        self.num_chunks = self.plan.num_chunks
        self._segments: list[list[tuple[int, int, object]] | None] = [None] * self.num_layers
        self._maps: list[SegmentMap | None] = [None] * self.num_layers
        self._resent_bytes = 0
        self.opening = None  # the Open message, re-sent on a resumed connection
        self._acked = [False] * self.num_layers
        self._num_acked = 0
        self._wire_bytes = 0
        self._finished_at: float | None = None
        self.error: KVWireError | None = None
        self._cv = threading.Condition()

    # -- engine API ---------------------------------------------------------------------

    def send_layer(self, layer: int, tensors: Mapping[str, object], *, block_ids=None) -> None:
        """Queue ``layer``'s tensors for sending and return at once.

        The arrays are borrowed, not copied: do not modify or free them until
        ``finish()`` returns (or ``layer_sent(layer)`` is True). With ``block_ids``, each
        per-token tensor is the engine's paged pool ``[num_blocks, block_size, ...]`` and
        the request's tokens are gathered from those blocks (and encoded, with a lossy
        codec) before this returns. Raises ValueError naming the layer and tensor on a
        wrong name, shape, dtype or block id, ValueError on NaN/Inf under a lossy codec,
        and the request's error if it has already failed. Blocks only while the sender's
        queue is full.
        """
        if self.error is not None:
            raise again(self.error)
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"request {self.request_id!r}: layer {layer} out of range (layout has {self.num_layers})")
        if self._segments[layer] is not None:
            raise ValueError(f"request {self.request_id!r}: layer {layer} was already sent")
        if self._codec is not None or block_ids is not None:
            tensors = self._prepare(layer, tensors, block_ids)
        self._segments[layer] = self._segments_of(layer, tensors)
        self._maps[layer] = SegmentMap([(start, length) for start, length, _ in self._segments[layer]])
        self._sender._enqueue(self, layer, self.num_chunks[layer])
        # Hand the GIL to the I/O threads now: a caller that goes straight on to its next
        # layer in Python would otherwise hold it for a whole switch interval (5 ms) and
        # the bytes of this layer would wait instead of overlapping that work.
        time.sleep(0)

    def _prepare(self, layer: int, tensors: Mapping[str, object], block_ids) -> dict[str, object]:
        """Gather paged tensors and encode those the codec applies to: the wire arrays."""
        self._check_names(layer, tensors)
        wire: dict[str, object] = {}
        for name, spec in self._layout.layers[layer].items():
            where = f"request {self.request_id!r} layer {layer} tensor {name!r}"
            array = tensors[name]
            if block_ids is not None and spec.per_token:
                if device.is_device(array):
                    keep = self._sender.takes_device_memory
                    wire.update(
                        device_gather_encode(array, block_ids, self.num_tokens, spec, self._codec, name, where, keep)
                    )
                    continue
                array = paged.gather(array, block_ids, self.num_tokens, spec, where)
                array = array.view(numpy_dtype(spec.dtype)).reshape(spec.full_shape(self.num_tokens))
            if not encodes(self._codec, spec):
                wire[name] = array
                continue
            flat, shape, dtype = as_bytes(array)
            if shape != spec.full_shape(self.num_tokens) or not accepts(spec.dtype, dtype):
                raise ValueError(
                    f"{where}: expected {spec.dtype}{list(spec.full_shape(self.num_tokens))}, got {dtype}{list(shape)}"
                )
            heads, dim = geometry(spec.shape)
            x = bits_to_float32(flat, dtype).reshape(self.num_tokens, heads, dim)
            codes, scales = self._codec.encode(x, where)
            wire[name], wire[name + ".scales"] = codes, scales
        return wire

    def _check_names(self, layer: int, tensors: Mapping[str, object]) -> None:
        names = self._layout.layers[layer].keys()
        if tensors.keys() != names:
            raise ValueError(
                f"request {self.request_id!r} layer {layer}: missing tensors {sorted(names - tensors.keys())}, "
                f"unexpected tensors {sorted(tensors.keys() - names)}"
            )

    def layer_sent(self, layer: int) -> bool:
        """True once the receiver has verified ``layer``: its arrays may be reused. (Not
        merely once written to a socket: a dropped connection re-sends un-acked layers.)"""
        return self._acked[layer]

    def finish(self, timeout: float | None = None) -> TransferStats:
        """Block until the receiver has verified every layer; return the stats.

        Raises the request's error (PeerLostError, IntegrityError, RequestRejected...),
        ValueError if some layer was never sent, or TransferTimeout after ``timeout``
        seconds (default: the request's deadline), in which case the request is aborted.
        """
        missing = [i for i, seg in enumerate(self._segments) if seg is None]
        if missing and self.error is None:
            raise ValueError(f"request {self.request_id!r}: finish() before layers {missing} were sent")
        wait_s = self.deadline - self._clock.now() if timeout is None else timeout
        with self._cv:
            self._cv.wait_for(lambda: self.error is not None or self._num_acked == self.num_layers, max(0.0, wait_s))
        if self.error is None and self._num_acked < self.num_layers:
            confirmed = f"receiver confirmed {self._num_acked}/{self.num_layers} layers within {wait_s:.3g}s"
            if self._sender.num_streams == 0:  # the real cause: the connection is gone and not back
                self._abort(
                    PeerLostError(f"request {self.request_id!r}: connection lost and not re-established; {confirmed}")
                )
            else:
                self._abort(TransferTimeout(f"request {self.request_id!r}: {confirmed}"))
        if self.error is not None:
            raise again(self.error)
        return self.stats

    def abort(self, reason: str = "aborted by the sender") -> None:
        """Give up on the request; the receiver drops what it holds of it."""
        self._abort(TransferAborted(f"request {self.request_id!r}: {reason}"))

    @property
    def stats(self) -> TransferStats:
        end = self._finished_at or self._clock.now()
        raw = self._layout.nbytes(self.num_tokens)
        return TransferStats(
            raw, self._wire_bytes, self.codec, self.num_layers, end - self.opened_at, self._resent_bytes
        )

    @property
    def done(self) -> bool:
        return self._num_acked == self.num_layers

    def __enter__(self) -> "Transfer":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and not self.done:
            self.abort(f"{exc_type.__name__} in the sending code")

    def __repr__(self) -> str:
        return f"<Transfer {self.request_id!r} T={self.num_tokens} {self._num_acked}/{self.num_layers} layers acked>"

    # -- building frames (sender's I/O threads) -----------------------------------------

    def _segments_of(self, layer: int, tensors: Mapping[str, object]) -> list[tuple[int, int, object]]:
        plan = self._plans[layer]
        if len(plan.slots) > 8:
            joined = _join_uniform(plan, tensors)
            if joined is not None:
                return [(0, plan.nbytes, joined)]
        if len(tensors) != len(plan.slots) or any(slot.name not in tensors for slot in plan.slots):
            self._check_names(layer, tensors)
        segments: list[tuple[int, int, object]] = []
        position = 0
        for slot in plan.slots:
            array = tensors[slot.name]
            shape = None
            if isinstance(array, device.DeviceBytes):  # gathered (and encoded) on the device
                buffer, shape, dtype = array
            elif device.is_device(array) and self._sender.takes_device_memory:
                buffer, shape, dtype = device.device_bytes(array)  # sent from where it is
            # Fast path (thousands of small tensors per layer are common): a contiguous
            # numpy array of the right dtype and shape goes out as it is.
            elif (
                type(array) is np.ndarray
                and array.shape == slot.shape
                and array.dtype == numpy_dtype(slot.spec.dtype)
                and array.flags.c_contiguous
            ):
                buffer = array if array.dtype in _BUFFER_DTYPES else exportable(array)
            else:
                buffer, shape, dtype = as_bytes(array)
            if shape is not None and (shape != slot.shape or not accepts(slot.spec.dtype, dtype)):
                raise ValueError(
                    f"request {self.request_id!r} layer {layer} tensor {slot.name!r}: expected "
                    f"{slot.spec.dtype}{list(slot.shape)}, got {dtype}{list(shape)}"
                )
            if slot.offset > position:
                segments.append((position, slot.offset - position, _PAD[: slot.offset - position]))
            if slot.nbytes:
                segments.append((slot.offset, slot.nbytes, buffer))
            position = slot.offset + slot.nbytes
        if (
            len(segments) > 8
            and plan.nbytes < _SMALL_PIECE_BYTES * len(segments)
            and not any(device.is_device(segment[2]) for segment in segments)
        ):
            # Many small tensors: one copy into a single buffer beats walking them per frame.
            return [(0, plan.nbytes, b"".join([segment[2] for segment in segments]))]
        return segments

    def chunk(self, layer: int, chunk: int) -> tuple[list, int]:
        """(buffers, total bytes) of one chunk of ``layer``'s byte stream."""
        start, end = self.plan.chunk_span(layer, chunk)
        segments = self._segments[layer]
        pieces = []
        for i, lo, hi in self._maps[layer].spans(start, end):
            _, seg_len, buffer = segments[i]
            if hi - lo == seg_len:
                pieces.append(buffer)
            elif device.is_device(buffer):
                pieces.append(buffer[lo:hi])
            else:
                pieces.append(memoryview(buffer).cast("B")[lo:hi])
        return pieces, end - start

    def _chunk_written(self, layer: int, nbytes: int, resend: bool = False) -> None:
        with self._cv:
            self._wire_bytes += nbytes
            if resend:
                self._resent_bytes += nbytes

    def _unacked_layers(self) -> list[int]:
        with self._cv:
            return [i for i, seg in enumerate(self._segments) if seg is not None and not self._acked[i]]

    def _layer_acked(self, layer: int, on_complete=None) -> bool:
        """Record the receiver's ack; True when the whole request is confirmed, and then
        ``on_complete(stats)`` has run before ``finish()`` returns (the sender's metrics
        count the request by the time its caller sees it done)."""
        with self._cv:
            if self._acked[layer] or self.error is not None:
                return False
            self._acked[layer] = True
            self._num_acked += 1
            if self._num_acked < self.num_layers:
                return False
            self._finished_at = self._clock.now()
            self._segments = [[] for _ in self._segments]  # stop borrowing the caller's arrays
            self._maps = [SegmentMap(()) for _ in self._maps]
            if on_complete is not None:
                on_complete(self.stats)
            self._cv.notify_all()
            return True

    def _fail(self, error: KVWireError) -> bool:
        with self._cv:
            if self.error is not None or self._num_acked == self.num_layers:
                return False
            self.error = remembered(error)
            self._cv.notify_all()
            return True

    def _abort(self, error: KVWireError) -> None:
        if self._fail(error):
            self._sender._aborted(self, error)


_shape_of = operator.attrgetter("shape")
_dtype_of = operator.attrgetter("dtype")
_contiguous = operator.attrgetter("flags.c_contiguous")


def _join_uniform(plan: LayerPlan, tensors: Mapping[str, object]) -> bytes | None:
    """The layer's byte stream in one buffer, if it is made of many unpadded contiguous
    numpy arrays of exactly the planned shapes and exportable dtypes; else None.

    This is the many-small-blocks case (thousands of 1 KiB tensors per layer): every
    check runs in C over the whole layer (map/attrgetter/list compare), so the cost per
    tensor stays a fraction of a microsecond. Anything unusual takes the general path,
    which also produces the precise error message.
    """
    expected = _uniform_expectation(plan)
    if expected is None:
        return None
    names, shapes, dtypes = expected
    try:
        arrays = list(map(tensors.__getitem__, names))
    except KeyError:
        return None
    if (
        len(tensors) != len(names)
        or set(map(type, arrays)) != {np.ndarray}
        or list(map(_shape_of, arrays)) != shapes
        or list(map(_dtype_of, arrays)) != dtypes
        or not all(map(_contiguous, arrays))
    ):
        return None
    return b"".join(arrays)


_UNIFORM: dict[int, tuple[LayerPlan, object]] = {}  # by id(plan): hashing a plan would walk every slot


def _uniform_expectation(plan: LayerPlan):
    """(names, shapes, numpy dtypes) of a plan whose tensors sit back to back with no
    alignment padding and whose dtypes numpy exports as buffers; None otherwise."""
    cached = _UNIFORM.get(id(plan))
    if cached is not None and cached[0] is plan:
        return cached[1]
    position, expectation = 0, None
    for slot in plan.slots:
        if slot.offset != position or numpy_dtype(slot.spec.dtype) not in _BUFFER_DTYPES:
            break
        position += slot.nbytes
    else:
        expectation = (
            [slot.name for slot in plan.slots],
            [slot.shape for slot in plan.slots],
            [numpy_dtype(slot.spec.dtype) for slot in plan.slots],
        )
    if len(_UNIFORM) > 256:
        _UNIFORM.clear()
    _UNIFORM[id(plan)] = (plan, expectation)
    return expectation


def device_gather_encode(
    pool, block_ids, num_tokens: int, spec, codec, name: str, where: str, keep_on_device: bool
) -> dict[str, object]:
    """Fused gather (+quantize) of a CUDA pool with kvwire's kernels: the wire arrays, on
    the device (``keep_on_device``, for a connection that sends device memory) or as host
    copies; either way identical to what the CPU path makes from the same pool."""
    from .cuda import ops

    num_blocks, block_size = paged.pool_geometry(tuple(pool.shape), spec, where)
    rows = paged.token_rows(block_ids, block_size, num_tokens, num_blocks, where)
    bits = ops.device_rows(pool, num_blocks * block_size, spec.dtype, encoded=encodes(codec, spec))
    device_rows = ops.to_device(rows)
    if not encodes(codec, spec):
        parts = [(name, ops.gather_rows(bits, device_rows), spec.full_shape(num_tokens), spec.dtype)]
    else:
        heads, dim = geometry(spec.shape)
        codes, scales = ops.gather_quantize(bits, spec.dtype, device_rows, codec.name, heads, dim)
        code_part, scale_part = codec.parts(num_tokens, heads, dim)
        parts = [
            (name, codes, code_part.shape, code_part.dtype),
            (name + ".scales", scales, scale_part.shape, scale_part.dtype),
        ]
    if keep_on_device:
        return {
            wire_name: device.DeviceBytes(device.adopt(out), shape, dtype) for wire_name, out, shape, dtype in parts
        }
    return {
        wire_name: out.copy_to_host().view(numpy_dtype(dtype)).reshape(shape) for wire_name, out, shape, dtype in parts
    }
