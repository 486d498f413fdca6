"""Prefix blocks and the worker-side prefix cache.

A prompt is cut into blocks of ``block_tokens`` tokens. Block i's hash is chained over the
hash of block i-1, so one hash names the whole prefix up to that block's end, and two
prompts share a hash exactly where they share that prefix.

Hybrid models keep a linear-attention state that is valid only at the exact length it was
computed to, so a prefix is reusable only at a boundary where an entry was stored: an
entry holds the prefix's KV *and* the linear states at that boundary. The worker reports
the hashes of the boundaries it holds; the router matches them (serving.policy).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import xxhash

logger = logging.getLogger(__name__)
logger.addHandler(logging.NullHandler())


@dataclass(frozen=True)
class PromptBlocks:
    """The chained hashes of a prompt's reusable block boundaries.

    Only boundaries strictly before the last token count: the last token must always be
    prefilled to produce the first output token's logits, so a prompt of exactly k blocks
    can reuse at most k - 1 of them.
    """

    num_tokens: int
    block_tokens: int
    hashes: tuple[str, ...]

    def cached_tokens(self, num_blocks: int) -> int:
        return num_blocks * self.block_tokens


def block_hashes(tokens: Sequence[int], block_tokens: int, salt: bytes = b"") -> list[str]:
    """Chained 128-bit hashes (hex) of every full block of ``tokens``.

    ``salt`` starts the chain; give it something that tells caches apart that must not mix
    (the model and KV layout fingerprint), since a match makes a worker trust the KV.
    """
    if block_tokens < 1:
        raise ValueError(f"block_tokens must be >= 1, got {block_tokens}")
    ids = np.asarray(tokens, dtype=np.int64)
    if ids.ndim != 1:
        raise ValueError(f"tokens must be a flat list of token ids, got shape {ids.shape}")
    out = []
    previous = salt
    for end in range(block_tokens, ids.size + 1, block_tokens):
        previous = xxhash.xxh3_128_digest(previous + ids[end - block_tokens:end].astype("<i8").tobytes())
        out.append(previous.hex())
    return out


def prompt_blocks(tokens: Sequence[int], block_tokens: int, salt: bytes = b"") -> PromptBlocks:
    """The boundaries a request for ``tokens`` may reuse (see PromptBlocks)."""
    reusable = tokens[: max(len(tokens) - 1, 0)]
    return PromptBlocks(len(tokens), block_tokens, tuple(block_hashes(reusable, block_tokens, salt)))


@dataclass(frozen=True)
class Hit:
    """The longest cached boundary for a prompt: reuse ``value`` and prefill from ``num_tokens``."""

    num_tokens: int
    block_hash: str
    value: Any


@dataclass
class _Entry:
    num_tokens: int
    value: Any
    num_bytes: int


class PrefixCache:
    """An LRU store of per-boundary entries, bounded by their total bytes.

    Entries are opaque (the engine's KV and linear states at that boundary) with a byte size
    the caller states. ``on_evict`` is called with each value dropped, so an engine can free
    device memory. Thread-safe: prefill hooks and the HTTP loop may share one cache.
    """

    def __init__(self, capacity_bytes: int, block_tokens: int, salt: bytes = b"",
                 on_evict: Callable[[Any], None] | None = None) -> None:
        if capacity_bytes < 0 or block_tokens < 1:
            raise ValueError(f"need capacity_bytes >= 0 and block_tokens >= 1, got {capacity_bytes}, {block_tokens}")
        self.capacity_bytes = capacity_bytes
        self.block_tokens = block_tokens
        self.salt = salt
        self.on_evict = on_evict
        self.used_bytes = 0
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def can_put(self, num_bytes: int) -> bool:
        """Whether an entry of this size fits at all (evicting everything else if need be)."""
        return 0 <= num_bytes <= self.capacity_bytes

    def put(self, prefix: Sequence[int], value: Any, num_bytes: int) -> str:
        """Store the entry for the boundary at ``len(prefix)``; returns its block hash.

        ``prefix`` must end on a block boundary. Least recently used entries are evicted
        until the new one fits; an existing entry for the same boundary is replaced.
        """
        if len(prefix) == 0 or len(prefix) % self.block_tokens:
            raise ValueError(f"a prefix must be a positive multiple of {self.block_tokens} tokens, got {len(prefix)}")
        if not self.can_put(num_bytes):
            raise ValueError(f"an entry of {num_bytes} bytes cannot fit a cache of {self.capacity_bytes} bytes")
        key = block_hashes(prefix, self.block_tokens, self.salt)[-1]
        evicted = []
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.used_bytes -= old.num_bytes
                if old.value is not value:
                    evicted.append(old.value)
            while self.used_bytes + num_bytes > self.capacity_bytes:
                evicted.append(self._evict_oldest())
            self._entries[key] = _Entry(len(prefix), value, num_bytes)
            self.used_bytes += num_bytes
        self._dropped(evicted)
        return key

    def lookup(self, tokens: Sequence[int]) -> Hit | None:
        """The longest cached boundary usable for a prompt (None on a miss); marks it recently used."""
        blocks = prompt_blocks(tokens, self.block_tokens, self.salt)
        with self._lock:
            for key in reversed(blocks.hashes):
                entry = self._entries.get(key)
                if entry is not None:
                    self._entries.move_to_end(key)
                    return Hit(entry.num_tokens, key, entry.value)
        return None

    def get(self, block_hash: str) -> Hit | None:
        """The entry for one exact boundary (None if not held); marks it recently used."""
        with self._lock:
            entry = self._entries.get(block_hash)
            if entry is None:
                return None
            self._entries.move_to_end(block_hash)
            return Hit(entry.num_tokens, block_hash, entry.value)

    def block_hashes(self) -> list[str]:
        """The boundaries held, to report to the router (least recently used first)."""
        with self._lock:
            return list(self._entries)

    def clear(self) -> None:
        with self._lock:
            values = [entry.value for entry in self._entries.values()]
            self._entries.clear()
            self.used_bytes = 0
        self._dropped(values)

    def _evict_oldest(self) -> Any:
        key, entry = self._entries.popitem(last=False)
        self.used_bytes -= entry.num_bytes
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("prefix cache evicts %s (%d tokens, %d bytes)", key, entry.num_tokens, entry.num_bytes)
        return entry.value

    def _dropped(self, values: list[Any]) -> None:
        # Called outside the lock: the callback may be slow (freeing device memory).
        if self.on_evict is not None:
            for value in values:
                self.on_evict(value)
