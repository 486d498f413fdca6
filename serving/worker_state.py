"""What workers tell the router beyond /health: prefix boundaries held and link metrics.

``GET /internal/state`` on every worker answers a ``serving.protocol.WorkerState``; the
router's control loop polls it. Peer metrics travel as kvwire's own PeerMetrics, so the
threshold controller works on the same objects a Sender returns in-process.
"""

from __future__ import annotations

from typing import Sequence

from kvwire.metrics import PeerMetrics

from .prefix_cache import PrefixCache
from .protocol import PrefixCacheInfo, WorkerState

boundary_suffix = "/boundary"  # request id of a prompt's boundary states, after the main id


def cache_info(cache: PrefixCache | None) -> PrefixCacheInfo | None:
    """The prefix cache's geometry for /health (None: this worker keeps no prefixes)."""
    if cache is None:
        return None
    return PrefixCacheInfo(block_tokens=cache.block_tokens, salt=cache.salt.decode(),
                           capacity_bytes=cache.capacity_bytes, used_bytes=cache.used_bytes, entries=len(cache))


def new_prefix_cache(capacity_bytes: int, block_tokens: int, layout) -> PrefixCache | None:
    """A worker's prefix cache (None at 0 bytes), salted with its KV layout's fingerprint."""
    if not capacity_bytes:
        return None
    return PrefixCache(capacity_bytes, block_tokens, layout.fingerprint.encode())


def state_body(cache: PrefixCache | None, peers: Sequence[PeerMetrics]) -> WorkerState:
    """The body of ``GET /internal/state``."""
    return WorkerState(prefix_blocks=cache.block_hashes() if cache is not None else [], prefix_cache=cache_info(cache),
                       peers=list(peers))
