"""Where a received layer's bytes land, and what turns them into the engine's tensors.

Three cases per tensor, chosen once when the request opens:
- direct: a lossless tensor with an ``expect()`` buffer; bytes land in it, no copy.
- staged: bytes land in receiver memory (one contiguous buffer per layer when nothing
  lands directly, which makes every chunk a single ``recv_into``).
- finished on arrival: after the layer verifies, encoded tensors are decoded into the
  layout dtype, and paged tensors are scattered into the engine's pool block ids.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np

from . import arrays, device, dtypes, paged, uniform
from .buffers import ReusedBuffers
from .codecs import Codec, float32_to_bits, geometry
from .dtypes import accepts
from .errors import RequestRejected
from .layout import ALIGN_BYTES, LayerPlan


@dataclass
class Expectation:
    """What ``Receiver.expect`` was told about a request before it opened.

    Each buffer is described once, here, in the engine's thread (``target``): the
    receiver's reader then places a request's layers without asking again what each
    buffer is, while the request's bytes wait behind its Open.
    """

    buffers: Mapping[int, Mapping[str, object]] = field(default_factory=dict)
    block_ids: object = None
    keep_quantized: bool = False
    # (layer, name) -> (flat bytes, shape, dtype, is CUDA memory), or why it cannot be written
    described: dict = field(default_factory=dict)
    # layer -> its buffers described at once, where all are plain host arrays (kvwire.uniform)
    host_layers: dict = field(default_factory=dict)

    @classmethod
    def of(cls, layout, request_id: str, buffers, block_ids=None, keep_quantized: bool = False) -> "Expectation":
        """``buffers`` (a mapping by layer, or a list by layer) checked against ``layout``:
        ValueError naming a layer out of range or a tensor the layer does not have."""
        buffers = buffers or {}
        if not isinstance(buffers, Mapping):
            buffers = dict(enumerate(buffers))
        for layer, tensors in buffers.items():
            if not 0 <= layer < layout.num_layers:
                raise ValueError(f"expect({request_id!r}): layer {layer} out of range (layout has {layout.num_layers})")
            unknown = set(tensors) - set(layout.layers[layer])
            if unknown:
                raise ValueError(f"expect({request_id!r}): layer {layer} has no tensors {sorted(unknown)}")
        expectation = cls(buffers, block_ids, keep_quantized)
        for layer, tensors in buffers.items():  # now, in the engine's thread
            specs = layout.layers[layer]
            host = uniform.describe_host_layer(list(specs), tensors)
            if host is not None:
                expectation.host_layers[layer] = host
                if not any(map(_per_token, specs.values())):
                    continue  # a request always fills it whole (else per tensor, below: it may not)
            for name in tensors:
                expectation._describe(layer, name)
        return expectation

    def on_device(self, layer: int, name: str) -> bool:
        """Whether the buffer for ``layer``'s tensor ``name`` is CUDA memory."""
        return self._describe(layer, name)[3]

    def target(self, layer: int, name: str) -> tuple[np.ndarray, tuple[int, ...], str, bool]:
        """(flat bytes, shape, dtype, on device) of a buffer to write into; ValueError if it
        cannot be one (not contiguous, read-only...)."""
        described = self._describe(layer, name)
        if described[0] is None:
            raise ValueError(described[1])
        return described

    def _describe(self, layer: int, name: str) -> tuple:
        described = self.described.get((layer, name))
        if described is None:
            array = self.buffers[layer][name]
            if type(array) is np.ndarray and array.flags.c_contiguous and array.flags.writeable:
                # most buffers, and thousands per request where tensors are small: the
                # fast path of arrays.writable_bytes (a numpy array is never CUDA memory)
                described = (array.reshape(-1).view(np.uint8), array.shape, dtypes.name_of_numpy(array.dtype), False)
            else:
                on_device = device.is_device(array)
                try:
                    described = (*arrays.writable_bytes(array), on_device)
                except ValueError as exc:
                    described = (None, str(exc), None, on_device)
            self.described[(layer, name)] = described
        return described


_PAD = np.empty(ALIGN_BYTES, dtype=np.uint8)  # where alignment gaps between direct tensors land (never read)
_per_token = operator.attrgetter("per_token")


@dataclass
class PlacedLayer:
    starts: list[int]  # where each segment begins in the layer's byte stream
    memories: list  # each segment's memory (flat bytes: numpy, memoryview or CUDA)
    outputs: list[tuple[str, np.ndarray, str, tuple[int, ...]]]  # what wait_layer returns: name, bytes, dtype, shape
    finishers: list[Callable[[], None]]  # run once the layer has verified
    own_bytes: int  # receiver memory this layer holds
    storage: np.ndarray | None = None  # the layer's one buffer, when outputs are plain views of it
    engine_arrays: dict = field(default_factory=dict)  # expect() buffers handed back as they are (CUDA; exact host)
    on_device: bool = False  # some segment is CUDA memory


def place_layer(
    index: int, plan: LayerPlan, layout_layer: Mapping, num_tokens: int, codec: Codec | None,
    expectation: Expectation | None, own_buffers: ReusedBuffers | None = None,
) -> PlacedLayer:
    """Where layer ``index``'s bytes land; ``codec`` is the request's, resolved once (None:
    lossless); a layer in receiver memory takes it from ``own_buffers`` if given."""
    expectation = expectation or Expectation()
    buffers = expectation.buffers.get(index, {})
    if not buffers and codec is None:  # the common case: one buffer; views are made on demand
        storage = np.empty(plan.nbytes, dtype=np.uint8) if own_buffers is None else own_buffers.get(plan.nbytes)
        return PlacedLayer([0], [storage], [], [], plan.nbytes, storage)
    is_paged = expectation.block_ids is not None
    where = f"expect() buffer for layer {index} tensor"
    if codec is None and not is_paged and len(buffers) == len(plan.slots):
        host = expectation.host_layers.get(index)
        whole = uniform.landing_plan(host, plan) if host is not None else None  # one check for the whole layer
        if whole is not None:
            return PlacedLayer(whole.offsets, host.views, [], [], 0, engine_arrays=dict(zip(host.names, host.arrays)))
        placed = _all_direct_to_host(index, plan, expectation, num_tokens)
        if placed is not None:
            return placed

    def lands_directly(slot) -> bool:
        spec = layout_layer[slot.source]
        return not slot.encoded and slot.source in buffers and not (is_paged and spec.per_token)

    slots = {slot.name: slot for slot in plan.slots}
    on_device = {name: expectation.on_device(index, name) for name in buffers}
    device_pools = set()  # paged CUDA pools: their wire bytes land in device memory, kernels scatter them
    for name in buffers:
        if not on_device[name] or lands_directly(slots[name]):
            continue
        if not (is_paged and layout_layer[name].per_token) or expectation.keep_quantized:
            raise RequestRejected(
                f"{where} {name!r}: a CUDA buffer takes a lossless tensor, or with block_ids a paged pool "
                "(not keep_quantized)"
            )
        device_pools.update(slot.name for slot in plan.slots if slot.source == name)
    direct = {
        slot.name: _destination_bytes(f"{where} {slot.name!r}", slot, expectation, index, num_tokens)
        for slot in plan.slots
        if lands_directly(slot)
    }
    segments, wire, own = _segments(plan, direct, device_pools)
    outputs: list[tuple[str, np.ndarray, str, tuple[int, ...]]] = []
    finishers: list[Callable[[], None]] = []
    engine_arrays = {
        name: buffers[name][:num_tokens] if layout_layer[name].per_token else buffers[name]
        for name in direct
        if on_device[name]
    }
    for name, spec in layout_layer.items():
        slot = slots[name]
        target = buffers.get(name)
        if target is not None and on_device[name] and name not in direct:  # a paged CUDA pool
            scales = slots.get(name + ".scales")
            finishers.append(
                _device_scatter(codec.name if codec else "none", spec, num_tokens, wire, slot, scales, target,
                                expectation.block_ids, where)
            )
            engine_arrays[name] = target
            outputs.append((name, None, spec.dtype, slot.shape))
            continue
        if not slot.encoded:
            if is_paged and spec.per_token and target is not None:
                finishers.append(
                    _scatter(wire[name], target, expectation.block_ids, num_tokens, spec, f"{where} {name!r}")
                )
            outputs.append((name, wire[name], spec.dtype, slot.shape))
            continue
        scales = slots[name + ".scales"]
        if expectation.keep_quantized:
            outputs.append((name, wire[name], slot.spec.dtype, slot.shape))
            outputs.append((scales.name, wire[scales.name], scales.spec.dtype, scales.shape))
            continue
        shape = spec.full_shape(num_tokens)
        if target is not None and not (is_paged and spec.per_token):
            decoded = _destination_bytes(
                f"{where} {name!r}", slot._replace(spec=spec, nbytes=spec.nbytes(num_tokens)), expectation, index,
                num_tokens,
            )
        else:
            decoded = np.empty(spec.nbytes(num_tokens), dtype=np.uint8)
            own += decoded.nbytes
        finishers.append(_decode(codec, spec, num_tokens, wire[name], slot, wire[scales.name], scales, decoded))
        if is_paged and spec.per_token and target is not None:
            finishers.append(_scatter(decoded, target, expectation.block_ids, num_tokens, spec, f"{where} {name!r}"))
        outputs.append((name, decoded, spec.dtype, shape))
    return PlacedLayer(*_split(segments), outputs, finishers, own, engine_arrays=engine_arrays,
                       on_device=bool(device_pools or engine_arrays))


def _all_direct_to_host(index: int, plan: LayerPlan, expectation: Expectation, num_tokens: int) -> PlacedLayer | None:
    """The common case of ``place_layer`` in one pass: every tensor of a lossless layer
    lands straight in its own host ``expect()`` buffer. None if any buffer is CUDA memory
    or does not fit (the general path then says which and why). Layers of thousands of
    small tensors are common: the checks are inline, at a few operations per tensor."""
    starts, memories, outputs, position = [], [], [], 0
    described, describe = expectation.described, expectation._describe
    for name, spec, offset, nbytes, slot_shape, _, _ in plan.slots:
        flat, shape, dtype, on_device = described.get((index, name)) or describe(index, name)
        if on_device or flat is None or not (dtype == spec.dtype or accepts(spec.dtype, dtype)):
            return None
        if not (shape[1:] == spec.shape and shape[0] >= num_tokens if spec.per_token else shape == spec.shape):
            return None
        if len(flat) != nbytes:  # (a per-token buffer longer than the request)
            flat = flat[:nbytes]
        if offset > position:
            starts.append(position)
            memories.append(_PAD[: offset - position])
        if nbytes:
            starts.append(offset)
            memories.append(flat)
        outputs.append((name, flat, spec.dtype, slot_shape))
        position = offset + nbytes
    return PlacedLayer(starts, memories, outputs, [], 0)


def _split(segments: list[tuple[int, object]]) -> tuple[list[int], list]:
    """(starts, memories) of a list of (start, memory)."""
    return [start for start, _ in segments], [memory for _, memory in segments]


def _segments(plan: LayerPlan, direct: Mapping[str, np.ndarray], on_device: set = frozenset()):
    """Receive memory for the layer's byte stream: one buffer, or per-slot pieces (device
    memory for the slots in ``on_device``)."""
    if not direct and not on_device:
        storage = np.empty(plan.nbytes, dtype=np.uint8)
        wire = {s.name: storage[s.offset : s.offset + s.nbytes] for s in plan.slots}
        return [(0, storage)], wire, plan.nbytes
    pad = np.empty(ALIGN_BYTES, dtype=np.uint8)  # alignment gaps land here
    segments, wire, own, position = [], {}, 0, 0
    for slot in plan.slots:
        if slot.offset > position:
            segments.append((position, pad[: slot.offset - position]))
        flat = direct.get(slot.name)
        if flat is None:
            flat = device.empty(slot.nbytes) if slot.name in on_device else np.empty(slot.nbytes, dtype=np.uint8)
            own += slot.nbytes
        if slot.nbytes:
            segments.append((slot.offset, flat))
        wire[slot.name] = flat
        position = slot.offset + slot.nbytes
    return segments, wire, own


def _decode(codec: Codec, spec, num_tokens, codes_bytes, codes_slot, scale_bytes, scale_slot, out: np.ndarray):
    heads, dim = geometry(spec.shape)

    def finish() -> None:
        codes = codes_bytes.view(dtypes.numpy_dtype(codes_slot.spec.dtype)).reshape(codes_slot.shape)
        scales = scale_bytes.view(dtypes.numpy_dtype(scale_slot.spec.dtype)).reshape(scale_slot.shape)
        out[:] = float32_to_bits(codec.decode([codes, scales], num_tokens, heads, dim), spec.dtype)

    return finish


def _scatter(source: np.ndarray, pool, block_ids, num_tokens: int, spec, where: str):
    try:
        rows_view, num_blocks, block_size = paged.pool_rows_view(pool, spec, where)
        rows = paged.token_rows(block_ids, block_size, num_tokens, num_blocks, where)
    except ValueError as exc:
        raise RequestRejected(str(exc)) from None

    def finish() -> None:
        rows_view[rows] = source.reshape(num_tokens, -1)

    return finish


def _device_scatter(codec_name, spec, num_tokens, wire, slot, scales_slot, pool, block_ids, where):
    """Finisher writing a layer's wire bytes (in device memory) into a paged CUDA pool's
    blocks with kvwire's kernels: a row copy, or dequantize+scatter for a lossy codec."""
    from .cuda import ops

    where = f"{where} {slot.source!r}"
    try:
        _, shape, dtype = device.device_bytes(pool, writable=True)
        if not dtypes.accepts(spec.dtype, dtype):
            raise ValueError(f"pool dtype {dtype}, layout says {spec.dtype}")
        num_blocks, block_size = paged.pool_geometry(shape, spec, where)
        rows = ops.to_device(paged.token_rows(block_ids, block_size, num_tokens, num_blocks, where))
        if slot.encoded and spec.dtype not in ops.KINDS:
            raise ValueError(f"the device decoder takes {sorted(ops.KINDS)}, not {spec.dtype}")
        pool_rows = ops.device_rows(pool, num_blocks * block_size, spec.dtype, encoded=slot.encoded)
    except ValueError as exc:
        raise RequestRejected(f"{where}: {exc}") from None
    row_bytes = spec.nbytes(1)

    def finish() -> None:
        if not slot.encoded:
            ops.scatter_rows(wire[slot.name].reshape(num_tokens, row_bytes), rows, pool_rows)
        else:
            heads, dim = geometry(spec.shape)
            codes = wire[slot.name].reshape(num_tokens, slot.nbytes // max(num_tokens, 1))
            scales = wire[scales_slot.name].view(np.float32 if codec_name == "fp8" else np.uint16)
            ops.dequantize_scatter(codes, scales, codec_name, heads, dim, rows, pool_rows, spec.dtype)
        device.synchronize()  # the pool holds the layer before it is reported ready

    return finish


def _destination_bytes(where: str, slot, expectation: Expectation, layer: int, num_tokens: int) -> np.ndarray:
    """The leading ``slot.nbytes`` of the engine buffer for ``slot``'s tensor, after
    checking it fits the slot."""
    try:
        flat, shape, dtype, _ = expectation.target(layer, slot.source)
    except ValueError as exc:
        raise RequestRejected(f"{where}: {exc}") from None
    spec = slot.spec
    if not dtypes.accepts(spec.dtype, dtype):
        raise RequestRejected(f"{where}: dtype {dtype}, layout says {spec.dtype}")
    fits = shape[1:] == spec.shape and shape[0] >= num_tokens if spec.per_token else shape == spec.shape
    if not fits:
        raise RequestRejected(f"{where}: shape {shape} cannot hold {spec.describe()} with T={num_tokens}")
    return flat[: slot.nbytes]


def typed(flat: np.ndarray, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    return (
        flat[: math.prod(shape) * dtypes.ITEMSIZE[dtype]]
        .view(dtypes.numpy_dtype(dtype))
        .reshape(shape)
    )
