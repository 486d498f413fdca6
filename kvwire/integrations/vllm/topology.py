"""Tensor parallelism between a prefill and a decode vLLM instance of different TP sizes.

Each rank holds a shard of every KV tensor, split along one axis by heads
(``kvwire.sharding``): attention KV by KV head, a GatedDeltaNet recurrent state by value
head, its conv state's channels as the q, k and v projections each split on its own, an
MLA latent replicated. ``Geometry`` describes the whole (unsharded) tensors, the same for
every TP size of one model, so two instances compare it to tell "another model" from
"another TP". A decode instance publishes itself (``DecodeInstance``) to probes of its
kvwire address; a prefill rank then sends each decode rank just its pieces, as one kvwire
request per (prefill rank, decode rank) pair in a *piece layout*: every tensor narrowed
to the pieces that pair carries, concatenated in the decode rank's order.
"""

from __future__ import annotations

import functools
from typing import Any

import msgspec

from ...layout import KVLayout, TensorSpec
from ...sharding import Piece, Segment, ShardedAxis, transfer_plan

MAX_TP = 64  # the prefill TP sizes a decode rank is ready to take pieces from


class ShardedTensor(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One wire tensor of a layer, whole: ``shape[axis]`` is split across ranks by
    ``segments`` (``(heads, head_size)`` each, in order); ``axis`` -1: kvwire does not know
    how vLLM shards it, so it moves only between instances of the same TP."""

    name: str
    dtype: str
    per_token: bool
    shape: tuple[int, ...]  # the whole tensor (a rank's own at TP 1), tokens excluded
    axis: int = -1
    segments: tuple[tuple[int, int], ...] = ()

    @property
    def sharded(self) -> ShardedAxis:
        return ShardedAxis(tuple(Segment(h, s, f"{self.name}[{i}]") for i, (h, s) in enumerate(self.segments)))

    def local_shape(self, tp: int) -> tuple[int, ...]:
        if self.axis < 0:
            return self.shape
        shape = list(self.shape)
        shape[self.axis] = self.sharded.local_size(tp)
        return tuple(shape)

    def dim(self) -> int:
        """The sharded dimension of the arrays that travel (tokens come first)."""
        return self.axis + (1 if self.per_token else 0)


class Geometry(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Every layer's tensors, whole: equal on two instances of the same model at any TP."""

    layers: tuple[tuple[ShardedTensor, ...], ...]

    def difference(self, other: Geometry, names: str = "") -> str | None:
        """None if equal, else the first layer and tensor that differ, said plainly."""
        if len(self.layers) != len(other.layers):
            return f"{len(self.layers)} KV layers here, {len(other.layers)} there"
        for index, (mine, theirs) in enumerate(zip(self.layers, other.layers)):
            if mine != theirs:
                describe = lambda ts: ", ".join(f"{t.name} {t.dtype}{list(t.shape)}" for t in ts)
                return f"layer {index}: {describe(mine)} here, {describe(theirs)} there" + (
                    f" (kvwire layers here: {names})" if names else "")
        return None

    def check_tp(self, tp: int) -> None:
        """ValueError naming the tensor where ``tp`` ranks cannot hold it."""
        for index, layer in enumerate(self.layers):
            for tensor in layer:
                if tensor.axis < 0:
                    continue
                try:
                    tensor.sharded.check(tp)
                except ValueError as exc:
                    raise ValueError(f"layer {index} {exc}") from None

    def unsharded(self) -> list[str]:
        return [f"layer {i} {t.name}" for i, layer in enumerate(self.layers) for t in layer if t.axis < 0]

    def local_layout(self, tp: int) -> KVLayout:
        return KVLayout([{t.name: TensorSpec(t.local_shape(tp), t.dtype, t.per_token) for t in layer}
                         for layer in self.layers])


class DecodeInstance(msgspec.Struct, forbid_unknown_fields=True):
    """What every rank of a decode instance publishes to probes (``Receiver(info=...)``)."""

    tp_size: int
    ranks: list[str]  # each rank's kvwire address
    geometry: Geometry
    block_size: int = 0  # its attention block size (informational: tokens land by position)


@functools.lru_cache(maxsize=4096)
def _plan(axis: ShardedAxis, source_tp: int, target_tp: int) -> tuple[Piece, ...]:
    return tuple(transfer_plan(axis, source_tp, target_tp))


def pieces(tensor: ShardedTensor, source_tp: int, source: int, target_tp: int, target: int) -> tuple[Piece, ...]:
    """What prefill rank ``source`` sends decode rank ``target`` of ``tensor``, in the
    order the piece layout concatenates them (the target's own order)."""
    return tuple(p for p in _plan(tensor.sharded, source_tp, target_tp) if p.source == source and p.target == target)


@functools.lru_cache(maxsize=4096)
def piece_layout(geometry: Geometry, source_tp: int, source: int, target_tp: int, target: int) -> KVLayout | None:
    """The layout of what ``source`` sends ``target`` (None: nothing); remembered, since
    a decode rank asks for its sources at every poll of a load."""
    layers, anything = [], False
    for layer in geometry.layers:
        tensors = {}
        for tensor in layer:
            carried = pieces(tensor, source_tp, source, target_tp, target)
            if carried:
                shape = list(tensor.local_shape(source_tp))
                shape[tensor.axis] = sum(p.length for p in carried)
                tensors[tensor.name] = TensorSpec(tuple(shape), tensor.dtype, tensor.per_token)
                anything = True
        layers.append(tensors)
    return KVLayout(layers) if anything else None


def targets_of(geometry: Geometry, source_tp: int, source: int, target_tp: int) -> list[int]:
    """The decode ranks prefill rank ``source`` sends to."""
    return [t for t in range(target_tp) if piece_layout(geometry, source_tp, source, target_tp, t) is not None]


def sources_of(geometry: Geometry, source_tp: int, target_tp: int, target: int) -> list[int]:
    """The prefill ranks decode rank ``target`` receives from."""
    return [s for s in range(source_tp) if piece_layout(geometry, source_tp, s, target_tp, target) is not None]


def accepted_layouts(geometry: Geometry, target_tp: int, target: int) -> list[KVLayout]:
    """Every piece layout decode rank ``target`` may be sent, by a prefill instance of
    any other TP size up to ``MAX_TP`` that can hold the model."""
    if geometry.unsharded():
        return []
    found: dict[str, KVLayout] = {}
    for source_tp in range(1, MAX_TP + 1):
        if source_tp == target_tp:
            continue
        try:
            geometry.check_tp(source_tp)
        except ValueError:
            continue
        for source in range(source_tp):
            layout = piece_layout(geometry, source_tp, source, target_tp, target)
            if layout is not None:
                found.setdefault(layout.fingerprint, layout)
    return list(found.values())


def select(tensors: dict[str, Any], layer: tuple[ShardedTensor, ...], source_tp: int, source: int,
           target_tp: int, target: int) -> dict[str, Any]:
    """A prefill rank's gathered torch tensors of one layer, narrowed to ``target``'s pieces."""
    import torch

    out = {}
    for tensor in layer:
        carried = pieces(tensor, source_tp, source, target_tp, target)
        if carried:
            whole, dim = tensors[tensor.name], tensor.dim()
            parts = [whole.narrow(dim, p.source_start, p.length) for p in carried]
            out[tensor.name] = parts[0].contiguous() if len(parts) == 1 else torch.cat(parts, dim)
    return out


def assemble(received: dict[int, dict[str, Any]], layer: tuple[ShardedTensor, ...], source_tp: int,
             target_tp: int, target: int, num_tokens: int) -> dict[str, Any]:
    """Decode rank ``target``'s own tensors of one layer, from each source's received
    arrays (``{source: {name: array}}``), every element written once."""
    import numpy as np

    out = {}
    for tensor in layer:
        shape = tensor.local_shape(target_tp)
        shape = (num_tokens, *shape) if tensor.per_token else shape
        whole, dim = None, tensor.dim()
        for source, arrays in received.items():
            offset = 0
            carried = pieces(tensor, source_tp, source, target_tp, target)
            part = np.asarray(arrays[tensor.name]) if carried else None
            for p in carried:
                if whole is None:
                    whole = np.empty(shape, dtype=part.dtype)
                index = [slice(None)] * len(shape)
                index[dim] = slice(p.target_start, p.target_start + p.length)
                source_index = [slice(None)] * len(shape)
                source_index[dim] = slice(offset, offset + p.length)
                whole[tuple(index)] = part[tuple(source_index)]
                offset += p.length
        out[tensor.name] = whole
    return out


def geometry_of(layout: KVLayout, kinds: list[str], hf_config, tp: int) -> Geometry:
    """The whole tensors behind this rank's ``layout`` (``kinds``: per layer "attention",
    "mla" or "state"), from the model's config: how vLLM shards Qwen3-Next/Qwen3.5-style
    models (attention KV by KV head, GatedDeltaNet state by head). A tensor that does not
    match what the config predicts for ``tp`` is left unsharded (axis -1)."""
    get = functools.partial(getattr, hf_config)
    gdn = all(hasattr(hf_config, k) for k in ("linear_num_key_heads", "linear_num_value_heads",
                                               "linear_key_head_dim", "linear_value_head_dim"))
    layers = []
    for kind, specs in zip(kinds, layout.layers):
        tensors = []
        for name, spec in specs.items():
            shape, whole = spec.shape, None
            if kind == "attention" and name == "kv" and hasattr(hf_config, "num_key_value_heads"):
                heads = get("num_key_value_heads")
                whole = ShardedTensor(name, spec.dtype, True, (heads, *shape[1:]), 0, ((heads, 1),))
            elif kind == "mla":
                whole = ShardedTensor(name, spec.dtype, True, shape, 0, ((1, shape[0]),))
            elif kind == "state" and gdn and name == "conv":
                hk, hv = get("linear_num_key_heads"), get("linear_num_value_heads")
                dk, dv = get("linear_key_head_dim"), get("linear_value_head_dim")
                segments = ((hk, dk), (hk, dk), (hv, dv))
                channels = 2 * hk * dk + hv * dv
                axis = next((a for a in (1, 0) if len(shape) == 2 and shape[a] * tp == channels), None)
                if axis is not None:
                    full = list(shape)
                    full[axis] = channels
                    whole = ShardedTensor(name, spec.dtype, False, tuple(full), axis, segments)
            elif kind == "state" and gdn and name == "recurrent":
                hv = get("linear_num_value_heads")
                whole = ShardedTensor(name, spec.dtype, False, (hv, *shape[1:]), 0, ((hv, 1),))
            if whole is None or whole.local_shape(tp) != shape:
                whole = ShardedTensor(name, spec.dtype, spec.per_token, shape)
            tensors.append(whole)
        layers.append(tuple(tensors))
    return Geometry(tuple(layers))
