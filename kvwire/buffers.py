"""Byte buffers handed out again once nothing else refers to them.

A fresh numpy buffer of a MiB or more costs the kernel's page faults and zeroing when it
is first written, each time: the allocator hands large freed blocks back to the kernel
between requests. On this project's 2-vCPU VM, 64 MiB of them took 30-100 ms more than
the same writes into memory touched before (perf/README.md, "Many small tensors"). The
Sender joins layers of many small tensors into such buffers, and the Receiver lands
layers it owns in them.
"""

from __future__ import annotations

import sys
import threading

import numpy as np


class ReusedBuffers:
    """Byte buffers by size, each handed out again only once nothing but this pool refers
    to it: every holder (a frame being written, a UCX send, a request's layer, an array or
    view the engine kept) holds a Python reference, so the count says it exactly.

    At most ``max_bytes`` are kept: a size that has no free buffer when the pool is full
    takes the room of free buffers of other sizes (requests of other lengths come and go),
    else is allocated as usual. Buffers under ``MIN_BYTES`` are never kept: the allocator
    serves those from memory it already has."""

    MIN_BYTES = 128 * 1024

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._held = 0
        self._buffers: dict[int, list[np.ndarray]] = {}
        self._lock = threading.Lock()
        self._unused_refs = _refs([np.empty(0)], 0)  # the count of a buffer only the pool holds

    def get(self, nbytes: int) -> np.ndarray:
        """An uninitialised byte buffer of ``nbytes``."""
        if nbytes < self.MIN_BYTES:
            return np.empty(nbytes, dtype=np.uint8)
        with self._lock:
            kept = self._buffers.setdefault(nbytes, [])
            for i in range(len(kept)):
                if _refs(kept, i) == self._unused_refs:
                    return kept[i]
            buffer = np.empty(nbytes, dtype=np.uint8)
            if self._held + nbytes > self.max_bytes:
                self._let_go(self._held + nbytes - self.max_bytes)
                kept = self._buffers.setdefault(nbytes, [])  # (an empty list may have gone)
            if self._held + nbytes <= self.max_bytes:
                kept.append(buffer)
                self._held += nbytes
            return buffer

    @property
    def held_bytes(self) -> int:
        """Bytes of the buffers kept (free or in use)."""
        return self._held

    def _let_go(self, nbytes: int) -> None:
        """Forget free buffers until ``nbytes`` are let go of, or none is free."""
        for size, kept in list(self._buffers.items()):
            for i in reversed(range(len(kept))):
                if _refs(kept, i) == self._unused_refs:
                    del kept[i]
                    self._held -= size
                    nbytes -= size
                    if nbytes <= 0:
                        return
            if not kept:
                del self._buffers[size]


def _refs(buffers: list, index: int) -> int:
    return sys.getrefcount(buffers[index])
