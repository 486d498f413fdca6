"""One request's geometry, computed once and shared by the sending and receiving sides.

A layer is a byte stream of its wire arrays (kvwire.layout.LayerPlan) cut into chunks of
``chunk_bytes``; the Open message carries ``chunk_bytes``, and both sides derive the rest
from it here, so the sender's frames and the receiver's targets cannot drift apart.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

from ..codecs import get_codec
from ..layout import KVLayout, LayerPlan
from ..wire.messages import Open


class SegmentMap:
    """Where the bytes of one layer's stream live: consecutive segments, by start offset.

    ``spans(start, end)`` names the pieces of ``[start, end)``: (segment index, offset in
    the segment, end offset in the segment), in stream order. The sender turns them into
    views of the caller's arrays, the receiver into views of where bytes land.
    """

    __slots__ = ("_lengths", "_starts")

    def __init__(self, extents: Sequence[tuple[int, int]]):
        self._starts = [start for start, _ in extents]
        self._lengths = [length for _, length in extents]

    @classmethod
    def of(cls, starts: list[int], lengths: list[int]) -> SegmentMap:
        """From the segments' starts and lengths as two lists (thousands of segments a layer)."""
        segment_map = cls.__new__(cls)
        segment_map._starts, segment_map._lengths = starts, lengths
        return segment_map

    def __len__(self) -> int:
        return len(self._starts)

    def spans(self, start: int, end: int) -> list[tuple[int, int, int]]:
        starts, lengths = self._starts, self._lengths
        i = max(0, bisect.bisect_right(starts, start) - 1)
        out = []
        while i < len(starts) and starts[i] < end:
            seg_start = starts[i]
            lo, hi = max(start, seg_start), min(end, seg_start + lengths[i])
            if hi > lo:
                out.append((i, lo - seg_start, hi - seg_start))
            i += 1
        return out


class RequestPlan:
    """A request's layers, codec and chunks: what both ends agree on once the Open is read."""

    __slots__ = ("chunk_bytes", "codec", "codec_name", "layers", "layout", "num_chunks", "num_tokens")

    def __init__(self, layout: KVLayout, num_tokens: int, codec: str, chunk_bytes: int):
        """ValueError if the codec is unknown or cannot carry some tensor of ``layout``."""
        if chunk_bytes < 1:
            raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
        self.layout = layout
        self.num_tokens = num_tokens
        self.codec_name = codec
        self.codec = get_codec(codec)  # resolved once per request, here
        layout.check_codec(self.codec)
        self.chunk_bytes = chunk_bytes
        self.layers: tuple[LayerPlan, ...] = layout.plans(num_tokens, codec, self.codec)
        self.num_chunks = [max(1, -(-plan.nbytes // chunk_bytes)) for plan in self.layers]

    @property
    def receive_bytes(self) -> int:
        """Most receiver memory the request takes: its layer streams, plus the decoded
        tensors under a lossy codec (what a receiver's budget is checked against)."""
        return self.layout.receive_bytes(self.num_tokens, self.codec_name)

    def open_message(self, rid: int, request_id: str, timeout_s: float) -> Open:
        """The Open that tells the receiver this plan."""
        return Open(rid, request_id, self.num_tokens, self.codec_name, self.chunk_bytes, timeout_s)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def chunk_span(self, layer: int, chunk: int) -> tuple[int, int]:
        """The [start, end) of ``chunk`` in ``layer``'s byte stream."""
        start = chunk * self.chunk_bytes
        return start, min(start + self.chunk_bytes, self.layers[layer].nbytes)

    def chunk_size(self, layer: int, chunk: int) -> int:
        start, end = self.chunk_span(layer, chunk)
        return end - start

    def check_data(self, layer: int, chunk: int, nbytes: int) -> str | None:
        """What is wrong with a Data frame for (layer, chunk) of ``nbytes`` (None: nothing)."""
        if not 0 <= layer < self.num_layers:
            return f"frame for layer {layer}, the layout has {self.num_layers}"
        if not 0 <= chunk < self.num_chunks[layer]:
            return f"layer {layer} chunk {chunk} out of range ({self.num_chunks[layer]} chunks)"
        expected = self.chunk_size(layer, chunk)
        if nbytes != expected:
            return f"layer {layer} chunk {chunk} has {nbytes} bytes, expected {expected}"
        return None

    def __repr__(self) -> str:
        return (f"RequestPlan(T={self.num_tokens}, codec={self.codec_name!r}, chunk_bytes={self.chunk_bytes}, "
                f"chunks={self.num_chunks})")
