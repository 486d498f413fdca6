"""KVLayout and TensorSpec: what a model's KV cache looks like, layer by layer.

A hybrid model mixes layers with fixed-size state (linear attention: recurrent and conv
state) and layers whose KV grows with the prompt (full attention K/V, MLA latents).
Both sides of a transfer must hold the same layout; its fingerprint is checked in the
handshake, and a mismatch is explained layer by layer.
"""

from __future__ import annotations

import hashlib
import math
import threading
from dataclasses import dataclass
from typing import Iterable, Mapping, NamedTuple

import msgspec

from . import dtypes
from .codecs import encodes, geometry, get_codec
from .wire.messages import LayerDesc, TensorDesc

# Each tensor starts on this boundary inside a layer's byte stream, so that views of a
# received layer are aligned for any dtype and for vector loads.
ALIGN_BYTES = 64
_UNRESOLVED = object()  # KVLayout.plans: no codec instance given, resolve it from its name


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a layer.

    ``per_token=True``: the array is ``(num_tokens, *shape)`` (attention K/V, MLA latent).
    ``per_token=False``: the array is exactly ``shape`` (linear-attention or conv state).
    """

    shape: tuple[int, ...]
    dtype: str
    per_token: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        if any(d < 0 for d in self.shape):
            raise ValueError(f"TensorSpec shape {self.shape} has a negative dimension")
        dtypes.check_name(self.dtype)

    @property
    def itemsize(self) -> int:
        return dtypes.ITEMSIZE[self.dtype]

    def full_shape(self, num_tokens: int) -> tuple[int, ...]:
        """The array shape for a request of ``num_tokens`` tokens."""
        return (num_tokens, *self.shape) if self.per_token else self.shape

    def nbytes(self, num_tokens: int) -> int:
        return math.prod(self.full_shape(num_tokens)) * self.itemsize

    def describe(self) -> str:
        dims = ("T", *self.shape) if self.per_token else self.shape
        return f"{self.dtype}[{', '.join(str(d) for d in dims)}]"


class TensorSlot(NamedTuple):
    """Where one wire array sits inside a layer's byte stream for a given token count.

    Without a codec each tensor is one slot. A tensor a lossy codec applies to becomes
    two slots, its codes (``name``) and scales (``name + ".scales"``), both ``encoded``,
    whose ``spec`` is the wire array's own (full shape, wire dtype).
    """

    name: str
    spec: TensorSpec
    offset: int
    nbytes: int
    shape: tuple[int, ...]
    source: str = ""
    encoded: bool = False


@dataclass(frozen=True)
class LayerPlan:
    """A layer's byte stream for one request: tensors in sorted-name order, aligned."""

    slots: tuple[TensorSlot, ...]
    nbytes: int

    @property
    def payload_bytes(self) -> int:
        """Bytes of tensor data, without alignment padding."""
        return sum(slot.nbytes for slot in self.slots)


class KVLayout:
    """The KV cache of one request: a list with one ``{name: TensorSpec}`` dict per layer.

    Tensor names within a layer are a set; their order does not matter.
    """

    def __init__(self, layers: Iterable[Mapping[str, TensorSpec]]):
        self.layers: tuple[dict[str, TensorSpec], ...] = tuple(
            {name: layer[name] for name in sorted(layer)} for layer in layers
        )
        for i, layer in enumerate(self.layers):
            for name, spec in layer.items():
                if not isinstance(spec, TensorSpec):
                    raise ValueError(f"layer {i} tensor {name!r}: expected a TensorSpec, got {type(spec).__name__}")
        self.fingerprint = hashlib.sha256(msgspec.msgpack.encode(self.describe())).hexdigest()[:32]
        # (name, spec, fixed bytes, bytes per token) per tensor, so a plan is arithmetic only
        self._sizes = tuple(
            tuple(
                (name, spec, 0 if spec.per_token else spec.nbytes(0), spec.nbytes(1) if spec.per_token else 0)
                for name, spec in layer.items()
            )
            for layer in self.layers
        )
        self._fixed_bytes = sum(size[2] for sizes in self._sizes for size in sizes)
        self._bytes_per_token = sum(size[3] for sizes in self._sizes for size in sizes)
        self._plan_cache: dict[tuple[int, str], tuple[LayerPlan, ...]] = {}
        self._plan_lock = threading.Lock()

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, KVLayout) and other.fingerprint == self.fingerprint

    def __hash__(self) -> int:
        return hash(self.fingerprint)

    def __repr__(self) -> str:
        return f"KVLayout({self.num_layers} layers, fingerprint={self.fingerprint})"

    def plan(self, layer: int, num_tokens: int, codec: str = "none") -> LayerPlan:
        """Byte offsets of every wire array of ``layer`` for a request of ``num_tokens``."""
        return self.plans(num_tokens, codec)[layer]

    def plans(self, num_tokens: int, codec: str = "none", instance=_UNRESOLVED) -> tuple[LayerPlan, ...]:
        """Plans of all layers for ``num_tokens`` (the last few are cached); ``instance``:
        the codec already resolved (kvwire.protocol.RequestPlan resolves it once)."""
        key = (num_tokens, codec)
        cached = self._plan_cache.get(key)
        if cached is None:
            instance = get_codec(codec) if instance is _UNRESOLVED else instance
            cached = tuple(self._plan(sizes, num_tokens, instance) for sizes in self._sizes)
            with self._plan_lock:
                if len(self._plan_cache) >= 8:
                    self._plan_cache.pop(next(iter(self._plan_cache)))
                self._plan_cache[key] = cached
        return cached

    @staticmethod
    def _plan(sizes, num_tokens: int, codec) -> LayerPlan:
        offset = 0
        slots = []

        def place(name, spec, nbytes, shape, source, encoded):
            nonlocal offset
            offset = -(-offset // ALIGN_BYTES) * ALIGN_BYTES
            slots.append(TensorSlot(name, spec, offset, nbytes, shape, source, encoded))
            offset += nbytes

        for name, spec, fixed, per_token in sizes:
            if encodes(codec, spec):
                for part in codec.parts(num_tokens, *geometry(spec.shape)):
                    part_spec = TensorSpec(part.shape, part.dtype)
                    place(name + part.suffix, part_spec, part_spec.nbytes(0), part.shape, name, True)
            else:
                shape = (num_tokens, *spec.shape) if spec.per_token else spec.shape
                place(name, spec, fixed + per_token * num_tokens, shape, name, False)
        return LayerPlan(tuple(slots), offset)

    def wire_bytes(self, num_tokens: int, codec: str = "none") -> int:
        """Bytes of a request's layer streams (wire arrays plus alignment padding)."""
        return sum(plan.nbytes for plan in self.plans(num_tokens, codec))

    def receive_bytes(self, num_tokens: int, codec: str = "none") -> int:
        """Most receiver memory a request can take: its wire arrays, plus the decoded
        tensors when a codec is used (the budget a receiver checks at open)."""
        return self.wire_bytes(num_tokens, codec) + (self.nbytes(num_tokens) if codec != "none" else 0)

    def check_codec(self, codec) -> None:
        """ValueError if some tensor of this layout cannot travel with ``codec`` (a name, or a
        resolved kvwire.codecs codec: None for lossless)."""
        instance = get_codec(codec) if isinstance(codec, str) else codec
        if instance is None:  # lossless carries every tensor (and this runs at every open)
            return
        for i, layer in enumerate(self.layers):
            for name, spec in layer.items():
                if encodes(instance, spec):
                    instance.check(*geometry(spec.shape), f"layer {i} tensor {name!r}")

    def nbytes(self, num_tokens: int) -> int:
        """Tensor bytes of a whole request (what an engine holds, without padding)."""
        return self._fixed_bytes + self._bytes_per_token * num_tokens

    def describe(self) -> list[LayerDesc]:
        """The layout as wire structs (the fingerprint is a hash of exactly this)."""
        return [
            LayerDesc([TensorDesc(name, list(spec.shape), spec.dtype, spec.per_token) for name, spec in layer.items()])
            for layer in self.layers
        ]

    @classmethod
    def from_description(cls, layers: list[LayerDesc]) -> "KVLayout":
        return cls(
            {t.name: TensorSpec(tuple(t.shape), t.dtype, t.per_token) for t in layer.tensors} for layer in layers
        )

    def difference(self, other: "KVLayout", *, mine: str = "receiver", theirs: str = "sender") -> str:
        """A sentence naming the first layer and tensor where two layouts differ."""
        if self.num_layers != other.num_layers:
            return f"{mine} has {self.num_layers} layers, {theirs} has {other.num_layers}"
        for i, (a, b) in enumerate(zip(self.layers, other.layers)):
            if set(a) != set(b):
                only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
                return f"layer {i}: tensors only on {mine}: {only_a}, only on {theirs}: {only_b}"
            for name in a:
                if a[name] != b[name]:
                    return (
                        f"layer {i} tensor {name!r}: {mine} has {a[name].describe()}, {theirs} has {b[name].describe()}"
                    )
        return "layouts are identical"
