"""The hybrid cache as a kvwire KVLayout: derive it, export it layer by layer, rebuild it.

transformers keeps one DynamicCache per request. Each linear-attention layer is a
LinearAttentionLayer holding a conv state (the last kernel_size inputs) and a recurrent
state (always float32, even for bf16 weights); each full-attention layer is a DynamicLayer
with per-token keys and values (for Kimi's MLA: the latent and the shared rope key, each
viewed as one head). kvwire sees the same tensors without the batch axis, per-token ones
as ``(tokens, heads, dim)``.

The decode side rebuilds the cache through the layers' own update methods, so the cache
it decodes from is the one an uninterrupted ``generate()`` would have had, bit for bit.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Callable, Iterator, Mapping

import numpy as np

from kvwire import KVLayout, TensorSpec

from .model import cache_keyword

log = logging.getLogger(__name__)

LINEAR = "linear_attention"
FULL = "full_attention"


def _state_names(index: int) -> tuple[str, str]:
    """Tensor names of conv/recurrent state ``index`` (layers may hold several)."""
    suffix = "" if index == 0 else str(index)
    return f"conv{suffix}", f"recurrent{suffix}"


def _shapes(config) -> tuple[tuple[int, int], tuple[int, ...], tuple[int, int], tuple[int, int]]:
    """(conv, recurrent, keys per token, values per token) shapes from the config."""
    kernel = config.linear_conv_kernel_dim
    if config.model_type == "kimi_linear":
        heads, dim = config.linear_num_heads, config.linear_head_dim
        return (3 * heads * dim, kernel), (heads, dim, dim), (1, config.kv_lora_rank), (1, config.qk_rope_head_dim)
    if config.model_type == "qwen3_next":
        key_dim = config.linear_num_key_heads * config.linear_key_head_dim
        value_dim = config.linear_num_value_heads * config.linear_value_head_dim
        recurrent = (config.linear_num_value_heads, config.linear_key_head_dim, config.linear_value_head_dim)
        attention = (config.num_key_value_heads, config.head_dim)
        return (2 * key_dim + value_dim, kernel), recurrent, attention, attention
    raise ValueError(f"no cache layout known for model_type {config.model_type!r} (kimi_linear, qwen3_next)")


def kv_layout(config, dtype: str) -> KVLayout:
    """The KVLayout of one request of a model with ``config`` whose weights are ``dtype``."""
    conv, recurrent, keys, values = _shapes(config)
    num_states = getattr(config, "number_of_conv_states", 1)
    layers = []
    for i, kind in enumerate(config.layer_types):
        if kind == LINEAR:
            layer = {}
            for s in range(num_states):
                conv_name, recurrent_name = _state_names(s)
                layer[conv_name] = TensorSpec(conv, dtype)
                layer[recurrent_name] = TensorSpec(recurrent, "float32")
        elif kind == FULL:
            layer = {"keys": TensorSpec(keys, dtype, per_token=True), "values": TensorSpec(values, dtype, per_token=True)}
        else:
            raise ValueError(f"layer {i}: layer type {kind!r} has no kvwire layout (expected {LINEAR} or {FULL})")
        layers.append(layer)
    return KVLayout(layers)


# -- export (prefill side) ------------------------------------------------------------------


def export_layer(cache, index: int, from_token: int = 0) -> dict[str, object]:
    """Layer ``index`` of a batch-1 cache as kvwire tensors (views where the layout allows).

    Per-token tensors start at ``from_token`` (the receiver already holds the tokens before
    it); states are always whole. The tensors are borrowed by ``send_layer`` until
    ``finish()``: nothing writes them again during a prefill, and the caller keeps
    ``cache`` alive until then.
    """
    layer = cache.layers[index]
    if hasattr(layer, "recurrent_states"):
        tensors = {}
        for s in range(layer.number_of_states):
            conv_name, recurrent_name = _state_names(s)
            tensors[conv_name] = layer.conv_states[s][0]
            tensors[recurrent_name] = layer.recurrent_states[s][0]
        return tensors
    # (1, heads, tokens, dim) -> (tokens, heads, dim); a copy only when heads > 1
    return {
        "keys": layer.keys[0, :, from_token:].transpose(0, 1).contiguous(),
        "values": layer.values[0, :, from_token:].transpose(0, 1).contiguous(),
    }


@contextlib.contextmanager
def layer_hooks(model, cache, on_layer: Callable[[int, dict[str, object]], None], from_token: int = 0) -> Iterator[None]:
    """Call ``on_layer(i, tensors)`` as each decoder layer finishes, during a forward.

    A forward hook on ``model.model.layers[i]`` fires once that layer's cache entry is
    complete, so the transfer of layer i overlaps the compute of layers i+1...
    """
    def hook(index: int):
        def call(module, args, output) -> None:  # None: a hook's return value would replace the output
            on_layer(index, export_layer(cache, index, from_token))

        return call

    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(model.model.layers)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def probe_layout(model, num_tokens: int = 5) -> KVLayout:
    """The layout read off a real forward pass (checks ``kv_layout`` against the model)."""
    import torch
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    ids = torch.arange(3, 3 + num_tokens).unsqueeze(0) % model.config.vocab_size
    with torch.no_grad():
        model(input_ids=ids, use_cache=True, logits_to_keep=1, **{cache_keyword(model): cache})
    layers = []
    for i in range(len(cache.layers)):
        tensors = export_layer(cache, i)
        layers.append(
            {
                name: TensorSpec(
                    tuple(t.shape[1:]) if name in ("keys", "values") else tuple(t.shape),
                    str(t.dtype).removeprefix("torch."),
                    per_token=name in ("keys", "values"),
                )
                for name, t in tensors.items()
            }
        )
    return KVLayout(layers)


# -- rebuild (decode side) ------------------------------------------------------------------


def to_torch(array):
    """A torch tensor sharing ``array``'s memory (bfloat16 arrays from ml_dtypes included)."""
    import torch

    if isinstance(array, torch.Tensor):
        return array
    if array.dtype.name == "bfloat16":
        return torch.from_numpy(array.view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def new_cache(config):
    """An empty cache with the model's layer types, ready for ``rebuild_layer``."""
    from transformers import DynamicCache

    return DynamicCache(config=config)


def rebuild_layer(cache, index: int, tensors: Mapping[str, np.ndarray]) -> None:
    """Write received layer ``index`` into ``cache`` through the layer's own update methods.

    The updates copy, so the received arrays may be released afterwards.
    """
    layer = cache.layers[index]
    if hasattr(layer, "recurrent_states"):
        for s in range(layer.number_of_states):
            conv_name, recurrent_name = _state_names(s)
            conv = to_torch(tensors[conv_name]).unsqueeze(0)
            cache.update_conv_state(conv, index, state_idx=s, conv_kernel_size=conv.shape[-1])
            cache.update_recurrent_state(to_torch(tensors[recurrent_name]).unsqueeze(0), index, state_idx=s)
        return
    keys = to_torch(tensors["keys"]).transpose(0, 1).unsqueeze(0)
    values = to_torch(tensors["values"]).transpose(0, 1).unsqueeze(0)
    cache.update(keys, values, index)


# -- prefix snapshots (prefix cache entries) ------------------------------------------------


def snapshot(cache, num_tokens: int, states=None) -> list[dict[str, object]]:
    """Owned copies of every layer at a prefix boundary: KV of the first ``num_tokens``
    tokens, and the linear states there (``states``: per-layer dicts received for exactly
    that boundary; default: the cache's own, which must then end at ``num_tokens``)."""
    layers = []
    for i in range(len(cache.layers)):
        tensors = export_layer(cache, i)
        if "keys" in tensors:
            layers.append({name: t[:num_tokens].clone() for name, t in tensors.items()})
        else:
            source = states[i] if states is not None else tensors
            layers.append({name: to_torch(t).clone() for name, t in source.items()})
    return layers


def restore(config, layers: list[Mapping[str, object]]):
    """A new cache holding a snapshot, ready to prefill (or rebuild) the tokens after it."""
    cache = new_cache(config)
    for i, tensors in enumerate(layers):
        rebuild_layer(cache, i, tensors)
    return cache


def snapshot_bytes(layers: list[Mapping[str, object]]) -> int:
    return sum(t.numel() * t.element_size() for layer in layers for t in layer.values())
