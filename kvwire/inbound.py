"""Receiver-side state of one request, and the handle an engine holds on it.

Bytes land where kvwire.placement says (straight into engine arrays where possible).
A layer counts as arrived only when every chunk of it has been received and its
checksum verified, and it has been decoded/scattered; nothing unverified is handed out.
"""

from __future__ import annotations

import threading
import time

import numpy as np

from . import uniform
from .buffers import ReusedBuffers
from .errors import KVWireError, TransferTimeout, again, remembered
from .placement import Expectation, place_layer, typed
from .protocol import MONOTONIC, Clock, RequestPlan, SegmentMap

_LANDED, _VERIFIED = 2, 1  # a chunk's entry in InboundRequest._seen (0: not yet here)


class InboundRequest:
    def __init__(
        self,
        request_id: str,
        plan: RequestPlan,
        timeout_s: float,
        peer: str,
        expectation: Expectation | None = None,
        clock: Clock = MONOTONIC,
        *,
        rid: int = -1,
        session=None,
        own_buffers: ReusedBuffers | None = None,
    ):
        self.request_id = request_id
        self.plan = plan  # the sender's, rebuilt from its Open: bytes land where the sender cut them
        self.num_tokens = num_tokens = plan.num_tokens
        self.codec = plan.codec_name
        self.peer = peer
        self.chunk_bytes = plan.chunk_bytes
        layout = plan.layout
        self._clock = clock
        self.opened_at = clock.now()
        self.deadline = self.opened_at + timeout_s
        self.plans = self.plan.layers
        self.num_layers = self.plan.num_layers
        self.num_chunks = self.plan.num_chunks
        self._seen = [bytearray(n) for n in self.num_chunks]
        self._missing = list(self.num_chunks)
        self._missing_total = sum(self.num_chunks)
        self.ready = [False] * self.num_layers
        self.num_ready = 0
        self.error: KVWireError | None = None
        self.finished_at: float | None = None
        self.released = False
        self.claimed = False  # an engine asked for it (Receiver.wait)
        # One lock, three conditions, so that nobody is woken for what they do not wait
        # for: a layer ready (wait_layer), the request settled (wait_done), the last write
        # into its memory ended (wait_writes; twice per chunk, and rarely waited on).
        self.cv = threading.Condition()
        self._settled = threading.Condition(self.cv)
        self._writes_ended = threading.Condition(self.cv)
        self._active_writes = 0
        self.rid = rid  # the sender session's number for it, and that session (the receiver's)
        self.session = session
        self._layers = [
            place_layer(i, plan, layout.layers[i], num_tokens, self.plan.codec, expectation, own_buffers)
            for i, plan in enumerate(self.plans)
        ]
        # a layer sent in one chunk lands in all of its segments, in order; the others'
        # chunks are cut by a map of their segments (made when first needed)
        self._whole = [placed.memories if n == 1 else None
                       for placed, n in zip(self._layers, self.num_chunks)]
        self._maps: list[SegmentMap | None] = [None] * self.num_layers
        self.nbytes = sum(placed.own_bytes for placed in self._layers)

    # -- where bytes land ---------------------------------------------------------------

    def targets(self, layer: int, chunk: int) -> list[np.ndarray]:
        """The memory a chunk's bytes go to, in order (one view unless it spans buffers)."""
        whole = self._whole[layer]
        if whole is not None:
            return whole
        placed = self._layers[layer]
        spans = self._maps[layer]
        if spans is None:
            spans = self._maps[layer] = SegmentMap.of(placed.starts, list(map(len, placed.memories)))
        memories = placed.memories
        return [memories[i][lo:hi] for i, lo, hi in spans.spans(*self.plan.chunk_span(layer, chunk))]

    def on_device(self, layer: int) -> bool:
        """Whether some of ``layer``'s memory is CUDA memory."""
        return self._layers[layer].on_device

    # -- state changes (called by the receiver's I/O threads) ---------------------------

    def is_duplicate(self, layer: int, chunk: int) -> bool:
        """Whether this chunk has already landed whole (verified, or awaiting its check)."""
        return bool(self._seen[layer][chunk])

    def landed(self, layer: int, chunk: int) -> None:
        """A chunk received in place awaits its check: a copy that arrives meanwhile (a
        resumed sender re-sends what was not acked) is drained, not written over it. If
        the check fails the request fails, so no copy is needed then either."""
        with self.cv:
            if not self._seen[layer][chunk]:
                self._seen[layer][chunk] = _LANDED

    def landed_whole(self, layers) -> None:
        """``landed`` for the one chunk of each of ``layers`` (a Layers frame's), under one lock."""
        seen = self._seen
        with self.cv:
            for layer in layers:
                if not seen[layer][0]:
                    seen[layer][0] = _LANDED

    def begin_write(self) -> bool:
        """Reserve the right to write into this request's memory; False once it is closed."""
        with self.cv:
            if self.error is not None or self.released:
                return False
            self._active_writes += 1
            return True

    def end_write(self) -> None:
        with self.cv:
            self._active_writes -= 1
            if not self._active_writes:
                self._writes_ended.notify_all()

    def wait_writes(self, timeout_s: float) -> bool:
        """Wait for in-progress writes into this request's memory to end."""
        with self.cv:
            return self._writes_ended.wait_for(lambda: self._active_writes == 0, timeout_s)

    def missing_only(self, layer: int, chunk: int) -> bool:
        """Whether this chunk is the last one the request still misses."""
        return self._missing_total == 1 and self._seen[layer][chunk] != _VERIFIED

    def record_chunk(self, layer: int, chunk: int) -> bool:
        """Record a verified chunk; True if it was the last one its layer missed. A chunk
        counts once: a resumed sender's copy may be verified while the first one still is."""
        with self.cv:
            if self._seen[layer][chunk] == _VERIFIED:
                return False
            self._seen[layer][chunk] = _VERIFIED
            self._missing[layer] -= 1
            self._missing_total -= 1
            return self._missing[layer] == 0

    def record_whole(self, layers) -> list[int]:
        """``record_chunk`` for the one chunk of each of ``layers`` (a Layers frame's,
        verified), under one lock: those it completed, to finish (the others were already
        verified: a resumed sender's copy)."""
        seen, missing, completed = self._seen, self._missing, []
        with self.cv:
            for layer in layers:
                if seen[layer][0] != _VERIFIED:
                    seen[layer][0] = _VERIFIED
                    missing[layer] -= 1
                    self._missing_total -= 1
                    completed.append(layer)
        return completed

    def layer_complete(self, layer: int) -> bool:
        return self._missing[layer] == 0

    @property
    def has_all_chunks(self) -> bool:
        """Every byte arrived and verified (layers may still be finishing)."""
        return self._missing_total == 0

    def finish_layer(self, layer: int) -> bool:
        """Decode/scatter a complete layer, then mark it ready; True if that completed
        the whole request."""
        return self.finish_layers((layer,))

    def finish_layers(self, layers) -> bool:
        """``finish_layer`` for each of ``layers``, marked ready together: the engine is
        woken once for them, not once each."""
        for layer in layers:
            for finish in self._layers[layer].finishers:
                finish()
        with self.cv:
            if self.error is not None or self.released:
                return False
            for layer in layers:
                self.ready[layer] = True
            self.num_ready += len(layers)
            self.cv.notify_all()
            if self.num_ready == self.num_layers:
                self.finished_at = self._clock.now()
                self._settled.notify_all()
            return self.num_ready == self.num_layers

    def fail(self, error: KVWireError) -> bool:
        """Fail the request unless it already completed or failed; True if this call did."""
        with self.cv:
            if self.error is not None or self.done or self.released:
                return False
            self.error = remembered(error)
            self.cv.notify_all()
            self._settled.notify_all()
            return True

    def mark_released(self) -> None:
        with self.cv:
            self.released = True
            self.cv.notify_all()
            self._settled.notify_all()

    @property
    def done(self) -> bool:
        return self.num_ready == self.num_layers

    def _arrays(self, layer: int) -> dict[str, np.ndarray]:
        placed = self._layers[layer]
        if placed.storage is not None:
            storage = placed.storage
            plan = self.plans[layer]
            blocks = uniform.split(plan, storage) if len(plan.slots) > uniform.MANY_TENSORS else None
            if blocks is not None:
                return blocks
            return {
                s.name: typed(storage[s.offset : s.offset + s.nbytes], s.spec.dtype, s.shape)
                for s in plan.slots
            }
        if not placed.outputs:  # every tensor landed in its expect() buffer as it is
            return dict(placed.engine_arrays)
        return {
            name: placed.engine_arrays[name] if name in placed.engine_arrays else typed(flat, dtype, shape)
            for name, flat, dtype, shape in placed.outputs
        }

    # -- what the engine waits on -------------------------------------------------------

    def wait_done(self, timeout_s: float | None) -> None:
        with self.cv:
            self._settled.wait_for(
                lambda: self.done or self.error is not None or self.released,
                None if timeout_s is None else max(0.0, timeout_s),
            )
            if self.released:
                raise KVWireError(f"request {self.request_id!r} was released")
            if self.done:
                return
            if self.error is not None:
                raise again(self.error)
            raise TransferTimeout(
                f"request {self.request_id!r}: not complete after {timeout_s}s "
                f"({self.num_ready}/{self.num_layers} layers arrived)"
            )

    def wait_layer(self, layer: int, timeout_s: float | None) -> dict[str, np.ndarray]:
        if not 0 <= layer < self.num_layers:
            raise IndexError(f"layer {layer} out of range: the layout has {self.num_layers} layers")
        with self.cv:
            self.cv.wait_for(
                lambda: self.ready[layer] or self.error is not None or self.released,
                None if timeout_s is None else max(0.0, timeout_s),
            )
            if self.released:
                raise KVWireError(f"request {self.request_id!r} was released; its arrays are no longer served")
            if self.ready[layer]:
                return self._arrays(layer)
            if self.error is not None:
                raise again(self.error)
            raise TransferTimeout(
                f"request {self.request_id!r}: layer {layer} not arrived after {timeout_s}s "
                f"({self.num_ready}/{self.num_layers} layers arrived)"
            )


class ReceivedRequest:
    """The engine's handle on a request being received.

    Returned by ``Receiver.wait`` as soon as the sender has opened the request. Layers
    can be used as soon as each has arrived (``wait_layer``). Arrays stay valid until
    ``release()`` (or leaving a ``with`` block), which also frees the receiver's memory.
    """

    def __init__(self, state: InboundRequest, release):
        self._state = state
        self._release = release

    @property
    def request_id(self) -> str:
        return self._state.request_id

    @property
    def num_tokens(self) -> int:
        return self._state.num_tokens

    @property
    def num_layers(self) -> int:
        return self._state.num_layers

    @property
    def peer(self) -> str:
        return self._state.peer

    @property
    def done(self) -> bool:
        """True once every layer has arrived and been verified."""
        return self._state.done

    @property
    def error(self) -> KVWireError | None:
        return self._state.error

    def is_ready(self, layer: int) -> bool:
        return self._state.ready[layer]

    def wait_layer(self, layer: int, timeout: float | None = None) -> dict[str, np.ndarray]:
        """Block until ``layer`` has arrived and been verified; return its arrays.

        Raises the request's error (PeerLostError, IntegrityError, TransferTimeout, ...)
        if it failed first, or TransferTimeout after ``timeout`` seconds. With
        ``timeout=None`` it waits as long as the request's own deadline allows.
        """
        return self._state.wait_layer(layer, timeout)

    def layer(self, layer: int, timeout: float | None = None) -> dict[str, np.ndarray]:
        """The arrays of ``layer`` by tensor name; blocks like ``wait_layer``."""
        return self._state.wait_layer(layer, timeout)

    def wait_done(self, timeout: float | None = None) -> None:
        """Block until every layer has arrived and been verified, without building arrays
        (for engines whose ``expect`` buffers already hold the data)."""
        self._state.wait_done(timeout)

    def wait_all(self, timeout: float | None = None) -> list[dict[str, np.ndarray]]:
        """Block until every layer has arrived; return all of them, in layer order."""
        deadline = None if timeout is None else time.monotonic() + timeout
        return [
            self._state.wait_layer(i, None if deadline is None else deadline - time.monotonic())
            for i in range(self.num_layers)
        ]

    def release(self) -> None:
        """Free the request on the receiver (aborting it if still in flight)."""
        self._release(self._state)

    close = release

    def __enter__(self) -> "ReceivedRequest":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __repr__(self) -> str:
        s = self._state
        status = "failed" if s.error else "done" if s.done else f"{s.num_ready}/{s.num_layers} layers"
        return f"<ReceivedRequest {s.request_id!r} T={s.num_tokens} from {s.peer}: {status}>"
