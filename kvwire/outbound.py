"""The engine's side of one request being sent: its handle (``Transfer``).

Its bytes are ``kvwire.layer_bytes.LayerBytes``: each layer a byte stream cut into chunks
of ``chunk_bytes`` that stripe across the sender's connections. What was acked, and how
the request ended, is the sending core's (``kvwire.protocol.sending``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping

from . import device, paged
from .arrays import as_bytes
from .codecs import bits_to_float32, encodes, geometry
from .dtypes import accepts, numpy_dtype
from .errors import KVWireError, TransferAborted, again
from .layer_bytes import LayerBytes, check_names
from .protocol import MONOTONIC, Clock
from .protocol.sending import OutboundRequest

if TYPE_CHECKING:
    from .outbox import Outbox


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
    """One request being sent, layer by layer: the engine's handle on it. Made by
    ``Sender.open``; the sender's queue (``kvwire.outbox``) carries its layers."""

    def __init__(self, request: OutboundRequest, outbox: Outbox, layers: LayerBytes, clock: Clock = MONOTONIC):
        self._request = request
        self._outbox = outbox
        self._layers = layers
        self._clock = clock
        self.request_id = request.request_id
        self.rid = request.rid
        self.plan = plan = request.plan  # the receiver cuts the request by the same plan, rebuilt from the Open
        self.num_tokens = plan.num_tokens
        self.codec = plan.codec_name
        self.chunk_bytes = plan.chunk_bytes
        self.num_layers = plan.num_layers
        self.num_chunks = plan.num_chunks
        self.opened_at = request.opened_at
        self.deadline = request.deadline
        self._layout = plan.layout
        self._codec = plan.codec

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
        self.send_layers({layer: tensors}, block_ids=block_ids)

    def send_layers(self, layers: Mapping[int, Mapping[str, object]], *, block_ids=None) -> None:
        """Queue several layers at once (``{layer: tensors}``), as ``send_layer`` does each,
        with the same errors; if one is refused, none is queued. Layers handed over
        together go out together: small ones share one frame (one header, checksum and
        receive for all), where one call each would cost a hand-over and a frame each. For
        what an engine has ready at once: a hybrid model's states after a forward pass, a
        short prompt's KV."""
        if self.error is not None:
            raise again(self.error)
        for layer in layers:
            if not 0 <= layer < self.num_layers:
                raise ValueError(f"request {self.request_id!r}: layer {layer} out of range (layout has {self.num_layers})")
            if self._layers.has(layer):
                raise ValueError(f"request {self.request_id!r}: layer {layer} was already sent")
        if self._codec is not None or block_ids is not None:
            layers = {layer: self._prepare(layer, tensors, block_ids) for layer, tensors in layers.items()}
        self._layers.take(layers)
        if self._outbox.submit(self._request, list(layers)):
            return  # written by this thread (small layers, a stream idle: kvwire.outbox)
        # Hand the GIL to the I/O threads now: a caller that goes straight on to its next
        # layer in Python would otherwise hold it for a whole switch interval (5 ms) and
        # the bytes of this layer would wait instead of overlapping that work.
        time.sleep(0)

    def _prepare(self, layer: int, tensors: Mapping[str, object], block_ids) -> dict[str, object]:
        """Gather paged tensors and encode those the codec applies to: the wire arrays."""
        check_names(self._layout, self.request_id, layer, tensors)
        wire: dict[str, object] = {}
        for name, spec in self._layout.layers[layer].items():
            where = f"request {self.request_id!r} layer {layer} tensor {name!r}"
            array = tensors[name]
            if block_ids is not None and spec.per_token:
                if device.is_device(array):
                    keep = self._layers.device_memory
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

    @property
    def error(self) -> KVWireError | None:
        """Why the request failed (None while it has not)."""
        return self._request.error

    def layer_sent(self, layer: int) -> bool:
        """True once the receiver has verified ``layer``: its arrays may be reused. (Not
        merely once written to a socket: a dropped connection re-sends un-acked layers.)"""
        return self._request.acked[layer]

    def finish(self, timeout: float | None = None) -> TransferStats:
        """Block until the receiver has verified every layer; return the stats.

        Raises the request's error (PeerLostError, IntegrityError, RequestRejected...),
        ValueError if some layer was never sent, or TransferTimeout after ``timeout``
        seconds (default: the request's deadline), in which case the request is aborted.
        """
        missing = [layer for layer in range(self.num_layers) if not self._layers.has(layer)]
        if missing and self.error is None:
            raise ValueError(f"request {self.request_id!r}: finish() before layers {missing} were sent")
        wait_s = self.deadline - self._clock.now() if timeout is None else timeout
        if not self._outbox.wait(self._request, wait_s):
            self._outbox.give_up(self._request, self._outbox.overdue(self._request, wait_s))
        if self.error is not None:
            raise again(self.error)
        return self.stats

    def abort(self, reason: str = "aborted by the sender") -> None:
        """Give up on the request; the receiver drops what it holds of it."""
        self._outbox.give_up(
            self._request, TransferAborted(f"request {self.request_id!r}: {reason}", request_id=self.request_id)
        )

    @property
    def stats(self) -> TransferStats:
        request = self._request
        end = request.finished_at or self._clock.now()
        raw = self._layout.nbytes(self.num_tokens)
        return TransferStats(
            raw, request.wire_bytes, self.codec, self.num_layers, end - self.opened_at, request.resent_bytes
        )

    @property
    def done(self) -> bool:
        return self._request.done

    def __enter__(self) -> "Transfer":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and not self.done:
            self.abort(f"{exc_type.__name__} in the sending code")

    def __repr__(self) -> str:
        acked = self._request.num_acked
        return f"<Transfer {self.request_id!r} T={self.num_tokens} {acked}/{self.num_layers} layers acked>"


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
