"""vLLM's KV cache as a kvwire KVLayout, and the copies between its blocks and the wire.

vLLM keeps one tensor per layer: paged attention KV for full-attention layers (its layout
depends on the attention backend) and, for linear-attention (GDN, KDA, Mamba) layers, a
tuple of state views indexed by block. kvwire describes each layer by what a request
holds, independent of paging: per token ``kv`` ``(kv_heads, 2, head_size)`` (keys then
values) or an MLA ``latent``; per request the states at the request's state slot. So a
prefill and a decode instance with different block sizes, block ids or attention backends
still agree, and two instances of different models (or cache dtypes) are refused in the
handshake with the layer named.

Tokens are moved by position: token p of a request lives in its block
``block_ids[p // block_size]`` at row ``p % block_size``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from ...layout import KVLayout, TensorSpec

_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")


def layer_index(name: str) -> int:
    """The decoder-layer number in a vLLM layer name (``model.layers.3.self_attn.attn``)."""
    match = _LAYER_INDEX.search(name)
    if match is None:
        raise ValueError(f"KVWireConnector: cannot tell the decoder layer of vLLM layer {name!r}")
    return int(match.group(1))


def dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


class AttentionLayer:
    """A full-attention layer's paged KV.

    - FlashAttention-style ``[2, blocks, block, kv_heads, head]``: ``kv`` per token,
      ``(kv_heads, 2, head)`` (keys then values), moved by token position; MLA
      ``[blocks, block, latent]``: ``latent`` per token, ``(1, latent)``.
    - vLLM CPU ``[blocks, kv_heads, block, 2 * head]``: per block and head the kernel
      keeps keys, then values, in an ISA-specific arrangement (AMX interleaves pairs of
      tokens), so the rows of a block are not its tokens. ``cpu_token_order`` learns the
      arrangement from the kernel's own write op; blocks are read and written through it,
      and tokens travel as ``kv`` by position like any other layout: the two sides may
      use different block sizes (vLLM derives them from the tensor-parallel size) or ISAs.
    """

    def __init__(self, name: str, cache, spec, num_blocks: int):
        import torch

        self.name, self.cache = name, cache
        self.block_size = spec.block_size
        heads, head = spec.num_kv_heads, spec.head_size
        shape = tuple(cache.shape)
        kind = type(spec).__name__
        dtype = dtype_name(cache.dtype)
        if kind == "MLAAttentionSpec" and len(shape) == 3 and shape[0] == num_blocks and shape[2] == head:
            self.form, self.kernel_block = "mla", shape[1]
            self.tensors = {"latent": TensorSpec((1, head), dtype, per_token=True)}
        elif len(shape) == 4 and shape[0] == num_blocks and shape[1] == heads and shape[3] == 2 * head:
            self.form, self.kernel_block = "cpu", shape[2]
            self.tensors = {"kv": TensorSpec((heads, 2, head), dtype, per_token=True)}
            self.order = cpu_token_order(name, cache.dtype, shape[2], heads, head)
        elif len(shape) == 5 and shape[0] == 2 and shape[1] == num_blocks and shape[3:] == (heads, head):
            self.form, self.kernel_block = "nhd", shape[2]
            self.tensors = {"kv": TensorSpec((heads, 2, head), dtype, per_token=True)}
        else:
            raise ValueError(
                f"KVWireConnector: layer {name!r}: KV cache of shape {list(shape)} is not a layout kvwire knows "
                f"({kind}: {num_blocks} blocks of {self.block_size} tokens, {heads} kv heads of {head}); "
                "expected [blocks, heads, block, 2*head] (CPU), [2, blocks, block, heads, head] or MLA [blocks, block, d]"
            )
        if self.block_size % self.kernel_block:
            raise ValueError(f"KVWireConnector: layer {name!r}: block size {self.block_size} is not a multiple "
                             f"of the kernel's {self.kernel_block}")
        (self.wire_name,) = self.tensors
        self._torch = torch

    def _kernel_blocks(self, block_ids, start: int, stop: int):
        """Kernel block ids of the request's blocks covering tokens start..stop-1."""
        torch = self._torch
        ids = torch.as_tensor(list(block_ids), dtype=torch.long)
        needed = -(-stop // self.block_size) if stop else 0
        if len(ids) < needed:
            raise ValueError(f"layer {self.name!r}: {stop} tokens in blocks of {self.block_size} need {needed} "
                             f"block ids, got {len(ids)}")
        ratio = self.block_size // self.kernel_block
        first, last = start // self.kernel_block, -(-stop // self.kernel_block)
        kernel = torch.arange(first, last, dtype=torch.long)
        return (ids[kernel // ratio] * ratio + kernel % ratio).to(self.cache.device)

    def _rows(self, block_ids, start: int, stop: int):
        """(kernel block, row) of tokens start..stop-1."""
        torch = self._torch
        positions = torch.arange(start, stop, dtype=torch.long)
        blocks = self._kernel_blocks(block_ids, start, stop)
        local = positions // self.kernel_block - start // self.kernel_block
        return blocks[local.to(blocks.device)], (positions % self.kernel_block).to(self.cache.device)

    def _cpu_tokens(self, blocks):
        """Kernel blocks ``blocks`` of the CPU layout as per-token ``(tokens, heads, 2, head)``."""
        flat = self.cache[blocks].reshape(len(blocks), -1)
        return flat[:, self.order].reshape(len(blocks) * self.kernel_block, *self.tensors["kv"].shape)

    def gather(self, block_ids, num_tokens: int) -> dict:
        """Tokens 0..num_tokens-1, contiguous, in kvwire's per-token shape."""
        name = self.wire_name
        if self.form == "cpu":
            return {name: self._cpu_tokens(self._kernel_blocks(block_ids, 0, num_tokens))[:num_tokens]}
        blocks, rows = self._rows(block_ids, 0, num_tokens)
        if self.form == "nhd":  # advanced indices side by side stay in place: [2, tokens, heads, head]
            return {name: self.cache[:, blocks, rows].permute(1, 2, 0, 3).contiguous()}
        return {name: self.cache[blocks, rows].unsqueeze(1)}

    def scatter(self, block_ids, start: int, num_tokens: int, tensors: dict) -> None:
        """Write tokens start..num_tokens-1 of received ``tensors`` into this engine's
        blocks. On CPU the rows before ``start`` (a local prefix hit) are kept and the
        rows past the prompt in its last block are zeroed: vLLM's hybrid pool shares
        memory between groups, so they may hold another group's state bits (NaN as bf16),
        and the CPU kernel's tile arithmetic over masked rows would spread them."""
        if start >= num_tokens:
            return
        source = tensors[self.wire_name]
        if self.form == "cpu":  # read, modify, write the blocks holding those tokens
            blocks = self._kernel_blocks(block_ids, start, num_tokens)
            tokens = self._cpu_tokens(blocks)
            first = start - start % self.kernel_block
            tokens[start - first:num_tokens - first] = source[start:num_tokens]
            tokens[num_tokens - first:] = 0
            flat = self.cache.new_empty((len(blocks), self.order.numel()))
            flat[:, self.order] = tokens.reshape(len(blocks), -1)
            self.cache[blocks] = flat.reshape(len(blocks), *self.cache.shape[1:])
            return
        blocks, rows = self._rows(block_ids, start, num_tokens)
        if self.form == "nhd":
            self.cache[:, blocks, rows] = source[start:num_tokens].permute(2, 0, 1, 3)
        else:
            self.cache[blocks, rows] = source[start:num_tokens, 0]


def cpu_token_order(name: str, dtype, block_size: int, num_heads: int, head_size: int):
    """Where vLLM's CPU attention kernel keeps each element of one block: ``order[e]`` is
    the position, in the block's flat storage ``[heads, block, 2 * head]``, of element
    ``e`` of its per-token view ``[block, heads, 2 (keys, values), head]``.

    The arrangement is the kernel's (and differs by ISA), so it is learnt from the
    kernel's own write op rather than copied here: each element is written as its index,
    a few base-128 digits at a time (small integers are exact in bf16 and fp16), and read
    back. A result that is not a permutation is refused rather than used.
    """
    import torch

    try:
        from vllm import _custom_ops as ops
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa
    except ImportError as exc:
        raise ValueError(f"KVWireConnector: layer {name!r}: vLLM's CPU attention ops are missing ({exc})") from None
    if not dtype.is_floating_point or dtype.itemsize < 2:
        raise ValueError(f"KVWireConnector: layer {name!r}: a {dtype} CPU KV cache is not supported "
                         "(use kv_cache_dtype 'auto')")
    isa = _get_attn_isa(dtype, block_size, head_size)
    count = block_size * num_heads * 2 * head_size
    element = torch.arange(count, dtype=torch.long).reshape(block_size, num_heads, 2, head_size)
    owner = torch.zeros(count, dtype=torch.long)
    cache = torch.zeros(1, num_heads, block_size * 2, head_size, dtype=dtype)
    keys, values = cache.chunk(2, dim=2)
    scale = 1
    while scale < count:
        cache.zero_()
        digit = ((element // scale) % 128 + 1).to(dtype)  # 1..128: a written zero would not show
        ops.cpu_attn_reshape_and_cache(digit[:, :, 0].contiguous(), digit[:, :, 1].contiguous(), keys, values,
                                       torch.arange(block_size, dtype=torch.long), isa, k_scale=1.0, v_scale=1.0,
                                       kv_cache_dtype="auto")
        owner += (cache.reshape(-1).to(torch.long) - 1) * scale
        scale *= 128
    if not torch.equal(owner.sort().values, torch.arange(count)):
        raise ValueError(f"KVWireConnector: layer {name!r}: vLLM's CPU attention kernel ({isa}) keeps a block in "
                         "an arrangement kvwire cannot read")
    order = torch.empty(count, dtype=torch.long)
    order[owner] = torch.arange(count)
    return order


class StateLayer:
    """A linear-attention layer's fixed-size state (conv and recurrent, or as many as the
    layer keeps), taken from and put into one state slot (a block id of its group)."""

    NAMES = {2: ("conv", "recurrent")}

    def __init__(self, name: str, views):
        self.name = name
        self.views = tuple(views)
        names = self.NAMES.get(len(self.views), tuple(f"state{i}" for i in range(len(self.views))))
        self.names = names
        self.tensors = {n: TensorSpec(tuple(v.shape[1:]), dtype_name(v.dtype)) for n, v in zip(names, self.views)}

    def gather(self, slot: int) -> dict[str, Any]:
        """Copies of the states in ``slot`` (the slot is free for reuse once this returns)."""
        return {n: v[slot].clone() for n, v in zip(self.names, self.views)}

    def scatter(self, slot: int, tensors: dict[str, Any]) -> None:
        for n, v in zip(self.names, self.views):
            v[slot].copy_(tensors[n].reshape(v.shape[1:]))


@dataclass
class CacheLayout:
    """Every layer of the model with a KV cache, in decoder order, and its KVLayout."""

    layers: list  # AttentionLayer | StateLayer, by kvwire layer index
    groups: list[int]  # each layer's KV cache group (whose block ids it uses)
    layout: KVLayout

    @classmethod
    def build(cls, kv_cache_config, caches: dict[str, Any]) -> CacheLayout:
        """From vLLM's ``kv_cache_config`` and each layer's cache as the model uses it
        (``static_forward_context[name].kv_cache``: a tensor, or a tuple of state views)."""
        group_of, spec_of = {}, {}
        for g, group in enumerate(kv_cache_config.kv_cache_groups):
            for name in group.layer_names:
                group_of[name], spec_of[name] = g, group.kv_cache_spec
        missing = sorted(set(group_of) - set(caches))
        if missing:
            raise ValueError(f"KVWireConnector: no KV cache registered for layers {missing}")
        names = sorted(group_of, key=layer_index)
        layers = []
        for name in names:
            cache, spec = caches[name], spec_of[name]
            if type(spec).__name__ == "MambaSpec":
                if isinstance(cache, (list, tuple)):
                    layers.append(StateLayer(name, cache))
                else:
                    raise ValueError(f"KVWireConnector: linear-attention layer {name!r} has no state views")
            else:
                layers.append(AttentionLayer(name, cache, spec, kv_cache_config.num_blocks))
        layout = KVLayout([layer.tensors for layer in layers])
        return cls(layers, [group_of[n] for n in names], layout)

    def kinds(self) -> list[str]:
        """Each layer's kind for ``topology.geometry_of``: "attention", "mla" or "state"."""
        return ["state" if isinstance(layer, StateLayer) else "mla" if layer.form == "mla" else "attention"
                for layer in self.layers]

    def block_size(self) -> int:
        """The attention block size (0 without attention layers)."""
        return max((layer.block_size for layer in self.layers if isinstance(layer, AttentionLayer)), default=0)

    def names(self) -> str:
        """``0=model.layers.0.linear_attn, 1=...``: for errors that name kvwire layer indices."""
        return ", ".join(f"{i}={layer.name}" for i, layer in enumerate(self.layers))

    def state_slot(self, block_ids: tuple[list[int], ...], group: int) -> int:
        """The block holding a request's running state: the last of its group's list
        (vLLM puts null blocks and superseded states before it)."""
        ids = block_ids[group]
        if not ids:
            raise ValueError(f"no state block allocated in KV cache group {group}")
        return ids[-1]


def to_torch(array, like_dtype):
    """A received numpy array (any kvwire dtype) as a torch CPU tensor of ``like_dtype``."""
    import torch

    flat = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
    return torch.from_numpy(flat).view(like_dtype).reshape(array.shape)
