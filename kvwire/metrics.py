"""Per-peer transfer metrics: bytes, goodput and the link's own congestion signals.

Goodput is an EWMA over completed requests (bytes / seconds from open to last ack),
which is what a scheduler wants to predict the next transfer's time; the kernel's
TCP_INFO (rtt, retransmits, delivery rate) tells it whether the link is congested.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from .transport.base import LinkStats


@dataclass(frozen=True)
class PeerMetrics:
    """A snapshot for one peer. ``links`` has one entry per live connection."""

    peer: str
    bytes: int
    requests_completed: int
    requests_failed: int
    goodput_bps: float
    links: tuple[LinkStats, ...] = ()

    @property
    def rtt_ms(self) -> float:
        return max((link.rtt_ms for link in self.links), default=0.0)

    @property
    def retransmits(self) -> int:
        return sum(link.total_retrans for link in self.links)


@dataclass
class PeerCounters:
    """Mutable counters behind a PeerMetrics snapshot."""

    alpha: float = 0.3
    bytes: int = 0
    requests_completed: int = 0
    requests_failed: int = 0
    goodput_bps: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add_bytes(self, num_bytes: int) -> None:
        with self.lock:
            self.bytes += num_bytes

    def completed(self, num_bytes: int, seconds: float) -> None:
        rate = num_bytes * 8 / max(seconds, 1e-9)
        with self.lock:
            self.requests_completed += 1
            first = self.goodput_bps == 0.0
            self.goodput_bps = rate if first else self.alpha * rate + (1 - self.alpha) * self.goodput_bps

    def failed(self) -> None:
        with self.lock:
            self.requests_failed += 1

    def snapshot(self, peer: str, links: tuple[LinkStats, ...]) -> PeerMetrics:
        with self.lock:
            return PeerMetrics(peer, self.bytes, self.requests_completed, self.requests_failed, self.goodput_bps, links)
