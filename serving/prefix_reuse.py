"""Prefill that reuses a cached prefix and leaves an entry at the prompt's last boundary.

A hybrid model's linear states are valid only at the length they were computed to, so a
prompt is prefilled in (up to) two chunks: up to its last block boundary, where the
cache is snapshotted into the worker's PrefixCache, then the rest. A later prompt with
the same prefix starts from that snapshot and prefills only its new tokens.

The same boundary's linear states are what a decode worker needs to keep its own entry
(it receives the KV, but the states only at the prompt's end), so the result carries them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from .hybrid_cache import layer_hooks, new_cache, restore, snapshot, snapshot_bytes
from .prefix_cache import PrefixCache
from .steps import forward


@dataclass
class ReusePrefill:
    """A prefill's logits and cache, and what it reused and stored."""

    logits: object
    cache: object
    reused_tokens: int  # taken from this worker's prefix cache
    boundary_tokens: int  # the prompt's last block boundary (0: none, or no prefix cache)
    boundary: list | None  # the snapshot at boundary_tokens (per-layer tensors), if one exists

    @property
    def boundary_states(self) -> list[dict]:
        """Per layer, the linear states at the boundary ({} for attention layers)."""
        return [{} if "keys" in layer else layer for layer in self.boundary]


def last_boundary(num_tokens: int, block_tokens: int) -> int:
    """The last block boundary strictly before the prompt's last token (which must always run)."""
    return (num_tokens - 1) // block_tokens * block_tokens


def prefill_reusing(model, token_ids: Sequence[int], prefix_cache: PrefixCache | None,
                    on_layer: Callable | None = None, send_from: int = 0) -> ReusePrefill:
    """Prefill ``token_ids``, reusing and refreshing ``prefix_cache`` (None: one plain pass).

    ``on_layer(i, tensors)`` fires as each layer of the last chunk completes, with the
    per-token tensors from ``send_from`` on (what the receiver does not hold yet).
    """
    n = len(token_ids)
    if not 0 <= send_from < n:
        raise ValueError(f"send_from={send_from} must be in [0, {n}) for a {n}-token prompt")
    hit = prefix_cache.lookup(token_ids) if prefix_cache is not None else None
    start = hit.num_tokens if hit else 0
    cache = restore(model.config, hit.value) if hit else new_cache(model.config)
    boundary, entry = 0, None
    if prefix_cache is not None:
        boundary = last_boundary(n, prefix_cache.block_tokens)
        if boundary > start:
            forward(model, cache, token_ids[start:boundary])
            entry = snapshot(cache, boundary)
            size = snapshot_bytes(entry)
            if prefix_cache.can_put(size):
                prefix_cache.put(token_ids[:boundary], entry, size)
        elif boundary and boundary == start:
            entry = hit.value
    position = max(start, boundary)
    hooks = layer_hooks(model, cache, on_layer, send_from) if on_layer is not None else None
    out = forward(model, cache, token_ids[position:], hooks)
    return ReusePrefill(out.logits[0, -1], cache, start, boundary if entry is not None else 0, entry)
