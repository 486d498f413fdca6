"""The router's policies, as pure functions of the numbers it has: no I/O, no clock.

- Cache-aware placement: the worker that reuses the longest cached prefix (ties: least loaded).
- Selective offload: a request whose incremental (uncached) length l exceeds a PrfaaS
  cluster's threshold t is prefilled there; otherwise by a local PD prefill worker.
- Bandwidth-aware threshold control: each PrfaaS cluster's t rises while its egress link,
  its congestion signals or its queue near their limits, and falls back once it is idle.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Sequence

from kvwire.metrics import PeerMetrics

from .errors import NoWorkerError
from .prefix_cache import PromptBlocks

logger = logging.getLogger(__name__)
logger.addHandler(logging.NullHandler())



# ---------------------------------------------------------------- cache-aware placement


@dataclass(frozen=True)
class WorkerView:
    """What the router knows of one worker: the boundaries it holds and how busy it is."""

    name: str
    block_hashes: frozenset[str] = frozenset()
    load: float = 0.0


@dataclass(frozen=True)
class Placement:
    """A worker for a request, and how much of the prompt it reuses and must prefill."""

    worker: str
    cached_tokens: int
    incremental_tokens: int


def reused_blocks(blocks: PromptBlocks, held: frozenset[str]) -> int:
    """How many leading blocks of the prompt a worker holding ``held`` can reuse.

    Only the longest held boundary matters: for hybrid models an entry is reusable exactly
    at its own boundary, and a chained hash names the whole prefix before it.
    """
    for num_blocks in range(len(blocks.hashes), 0, -1):
        if blocks.hashes[num_blocks - 1] in held:
            return num_blocks
    return 0


def place(blocks: PromptBlocks, workers: Sequence[WorkerView]) -> Placement:
    """The worker reusing the longest prefix; ties go to the least loaded, then the first listed.

    Works for decode workers too: there the incremental part is the KV that must move.
    """
    if not workers:
        raise NoWorkerError("no worker to place the request on")
    ranked = [(reused_blocks(blocks, w.block_hashes), -w.load, -i, w) for i, w in enumerate(workers)]
    num_blocks, _, _, worker = max(ranked, key=lambda r: r[:3])
    cached = blocks.cached_tokens(num_blocks)
    return Placement(worker.name, cached, blocks.num_tokens - cached)


# ---------------------------------------------------------------- selective offload


def offload(incremental_tokens: int, threshold_tokens: int) -> bool:
    """The selective-offload rule: only prefills longer than t are worth the WAN transfer."""
    return incremental_tokens > threshold_tokens


@dataclass(frozen=True)
class PrfaasCluster:
    """A PrfaaS prefill cluster as the router sees it, with its current threshold t."""

    name: str
    threshold_tokens: int
    workers: tuple[WorkerView, ...]


@dataclass(frozen=True)
class Route:
    """Where a request is prefilled: ``cluster`` is None for the local PD prefill pool."""

    cluster: str | None
    placement: Placement
    reason: str

    @property
    def offloaded(self) -> bool:
        return self.cluster is not None


def route(blocks: PromptBlocks, local: Sequence[WorkerView], clusters: Sequence[PrfaasCluster]) -> Route:
    """Choose local PD prefill or a PrfaaS cluster, then the worker, for one request.

    l is the incremental length on the best local worker: the work that would stay local.
    The request is offloaded when l exceeds some cluster's t; among those clusters, the
    worker reusing the longest prefix wins (then the least loaded). With no local worker
    the request goes to any PrfaaS cluster, since local PD is otherwise the fallback.
    """
    if not local:
        candidates = [c for c in clusters if c.workers]
        if not candidates:
            raise NoWorkerError("no local prefill worker and no PrfaaS worker")
        return _offload_to(blocks, candidates, "no local prefill worker")
    here = place(blocks, local)
    l = here.incremental_tokens
    eligible = [c for c in clusters if c.workers and offload(l, c.threshold_tokens)]
    if not eligible:
        limits = ", ".join(f"{c.name} t={c.threshold_tokens}" for c in clusters if c.workers) or "no PrfaaS worker"
        return Route(None, here, f"l={l} stays local ({limits})")
    return _offload_to(blocks, eligible, f"l={l} (local) > t")


def _offload_to(blocks: PromptBlocks, clusters: Sequence[PrfaasCluster], why: str) -> Route:
    owners = {w.name: c for c in clusters for w in c.workers}
    chosen = place(blocks, [w for c in clusters for w in c.workers])
    cluster = owners[chosen.worker]
    return Route(cluster.name, chosen, f"{why}: offload to {cluster.name} (t={cluster.threshold_tokens})")


# ---------------------------------------------------------------- bandwidth-aware threshold


@dataclass(frozen=True)
class LinkSample:
    """One control interval of a PrfaaS cluster's egress.

    ``egress_bps`` is what was actually sent over the interval (bits/s), ``retransmit_ratio``
    the share of sent bytes that were retransmissions, ``queue_depth`` the requests waiting
    for a prefill slot at the cluster. A ``min_rtt_ms`` of 0 means "no RTT signal yet".
    """

    egress_bps: float
    capacity_bps: float
    rtt_ms: float = 0.0
    min_rtt_ms: float = 0.0
    retransmit_ratio: float = 0.0
    queue_depth: int = 0

    def __post_init__(self) -> None:
        if self.capacity_bps <= 0:
            raise ValueError(f"capacity_bps must be > 0, got {self.capacity_bps}")
        if min(self.egress_bps, self.rtt_ms, self.min_rtt_ms, self.retransmit_ratio, self.queue_depth) < 0:
            raise ValueError(f"link signals cannot be negative: {self}")

    @property
    def utilization(self) -> float:
        return self.egress_bps / self.capacity_bps

    @property
    def rtt_ratio(self) -> float:
        return self.rtt_ms / self.min_rtt_ms if self.min_rtt_ms > 0 else 1.0


def egress_sample(before: Sequence[PeerMetrics], after: Sequence[PeerMetrics], interval_s: float,
                  capacity_bps: float, queue_depth: int) -> LinkSample:
    """A LinkSample from two snapshots of a PrfaaS worker's (or cluster's) Sender peer metrics.

    Counters of a peer seen only in ``after``, or that went backwards (a reconnect), count
    from zero. The RTT signal is that of the link whose RTT is furthest above its minimum.
    """
    if interval_s <= 0:
        raise ValueError(f"interval_s must be > 0, got {interval_s}")
    prev = {m.peer: m for m in before}
    sent = retrans = 0
    for m in after:
        old = prev.get(m.peer)
        sent += _delta(m.bytes, old.bytes if old else 0)
        retrans += _delta(_retrans_bytes(m), _retrans_bytes(old) if old else 0)
    links = [link for m in after for link in m.links if link.min_rtt_ms > 0]
    worst = max(links, key=lambda link: link.rtt_ms / link.min_rtt_ms, default=None)
    return LinkSample(
        egress_bps=sent * 8 / interval_s, capacity_bps=capacity_bps,
        rtt_ms=worst.rtt_ms if worst else 0.0, min_rtt_ms=worst.min_rtt_ms if worst else 0.0,
        retransmit_ratio=retrans / sent if sent else 0.0, queue_depth=queue_depth,
    )


def _retrans_bytes(m: PeerMetrics) -> int:
    return sum(link.bytes_retrans for link in m.links)


def _delta(now: int, then: int) -> int:
    return now - then if now >= then else now


@dataclass(frozen=True)
class ThresholdConfig:
    """Bounds and limits of the threshold controller.

    Each signal has a *busy* level (at or above it, t rises at once) and a lower *idle*
    level (t falls only after ``idle_intervals`` consecutive samples with every signal at
    or below it); between the two t holds. That gap plus the streak is the hysteresis.
    Set ``min_tokens`` to the planner's t: the controller then only ever offloads less than
    planned, and returns to the plan when the link is idle.
    """

    min_tokens: int
    max_tokens: int
    raise_factor: float = 1.5
    lower_factor: float = 0.8
    min_step_tokens: int = 64  # a raise adds at least this much (from t = 0, x1.5 alone would crawl)
    busy_utilization: float = 0.85
    idle_utilization: float = 0.5
    busy_rtt_ratio: float = 2.0
    idle_rtt_ratio: float = 1.2
    busy_retransmit_ratio: float = 0.01
    idle_retransmit_ratio: float = 0.001
    busy_queue_depth: int = 8
    idle_queue_depth: int = 1
    rtt_floor_ms: float = 1.0  # queueing delay below this is no congestion (loopback, one fabric)
    rtt_min_utilization: float = 0.3  # below this load the RTT is not trusted (see _signals)
    idle_intervals: int = 3
    raise_hold_intervals: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"need 0 <= min_tokens <= max_tokens, got {self.min_tokens}, {self.max_tokens}")
        if not (self.raise_factor > 1 and 0 < self.lower_factor < 1):
            raise ValueError(f"need raise_factor > 1 and 0 < lower_factor < 1, got {self.raise_factor}, "
                             f"{self.lower_factor}")
        for name in ("utilization", "rtt_ratio", "retransmit_ratio", "queue_depth"):
            idle, busy = getattr(self, f"idle_{name}"), getattr(self, f"busy_{name}")
            if not idle < busy:
                raise ValueError(f"idle_{name}={idle} must be below busy_{name}={busy}")
        if self.min_step_tokens < 1:
            raise ValueError(f"min_step_tokens must be >= 1, got {self.min_step_tokens}")
        if self.idle_intervals < 1 or self.raise_hold_intervals < 0:
            raise ValueError("need idle_intervals >= 1 and raise_hold_intervals >= 0")


@dataclass(frozen=True)
class ThresholdDecision:
    """The threshold after one sample, and why it moved (or held)."""

    threshold_tokens: int
    previous_tokens: int
    reason: str

    @property
    def changed(self) -> bool:
        return self.threshold_tokens != self.previous_tokens


def _signals(sample: LinkSample, cfg: ThresholdConfig) -> dict[str, tuple[float, str]]:
    # The kernel's smoothed RTT of an app-limited connection includes delayed acks (8-10 ms
    # measured on loopback with per-layer sends), so RTT inflation counts as queueing only
    # on a loaded link, and only by more than a floor.
    queueing = (sample.utilization >= cfg.rtt_min_utilization
                and sample.rtt_ms - sample.min_rtt_ms >= cfg.rtt_floor_ms)
    rtt_ratio = sample.rtt_ratio if queueing else 1.0
    return {
        "utilization": (sample.utilization, f"egress at {sample.utilization:.0%} of capacity"),
        "rtt_ratio": (rtt_ratio, f"rtt {rtt_ratio:.2f}x its minimum"),
        "retransmit_ratio": (sample.retransmit_ratio, f"retransmits {sample.retransmit_ratio:.2%} of bytes"),
        "queue_depth": (sample.queue_depth, f"queue depth {sample.queue_depth}"),
    }


class ThresholdController:
    """The threshold t of one PrfaaS cluster, driven by LinkSamples (deterministic).

    Every change of t is logged at INFO with its reason, and returned in the decision.
    """

    def __init__(self, config: ThresholdConfig, initial_tokens: int | None = None, name: str = "prfaas") -> None:
        t = config.min_tokens if initial_tokens is None else initial_tokens
        if not config.min_tokens <= t <= config.max_tokens:
            raise ValueError(f"initial t={t} is outside [{config.min_tokens}, {config.max_tokens}]")
        self.config = config
        self.name = name
        self.threshold_tokens = t
        self.num_idle = 0
        self.num_hold = 0

    def observe(self, sample: LinkSample) -> ThresholdDecision:
        """Feed one interval's sample; returns the (possibly new) t and the reason."""
        cfg, signals = self.config, _signals(sample, self.config)
        busy = [text + f" (>= {getattr(cfg, 'busy_' + k)})" for k, (v, text) in signals.items()
                if v >= getattr(cfg, "busy_" + k)]
        idle = all(v <= getattr(cfg, "idle_" + k) for k, (v, _) in signals.items())
        holding, self.num_hold = self.num_hold > 0, max(self.num_hold - 1, 0)
        self.num_idle = self.num_idle + 1 if idle and not busy else 0
        if busy:
            return self._raise("; ".join(busy), holding)
        if self.num_idle >= cfg.idle_intervals:
            self.num_idle = 0
            return self._lower(f"link idle for {cfg.idle_intervals} intervals ("
                               + "; ".join(text for _, text in signals.values()) + ")")
        return self._hold("signals between idle and busy" if not idle else
                          f"idle {self.num_idle}/{cfg.idle_intervals} intervals")

    def _raise(self, why: str, holding: bool) -> ThresholdDecision:
        t, cfg = self.threshold_tokens, self.config
        if t >= cfg.max_tokens:
            return self._hold(f"busy but t is at its maximum {cfg.max_tokens}: {why}")
        if holding:
            return self._hold(f"busy, waiting for the last raise to take effect: {why}")
        self.num_hold = cfg.raise_hold_intervals
        return self._move(min(cfg.max_tokens, max(t + cfg.min_step_tokens, math.ceil(t * cfg.raise_factor))),
                          f"busy: {why}")

    def _lower(self, why: str) -> ThresholdDecision:
        t, cfg = self.threshold_tokens, self.config
        if t <= cfg.min_tokens:
            return self._hold(f"t is at its minimum {cfg.min_tokens}: {why}")
        return self._move(max(cfg.min_tokens, min(t - 1, math.floor(t * cfg.lower_factor))), why)

    def _hold(self, why: str) -> ThresholdDecision:
        return ThresholdDecision(self.threshold_tokens, self.threshold_tokens, f"hold t={self.threshold_tokens}: {why}")

    def _move(self, new: int, why: str) -> ThresholdDecision:
        old, self.threshold_tokens = self.threshold_tokens, new
        verb = "raise" if new > old else "lower"
        reason = f"{verb} t {old} -> {new} ({'offload less' if new > old else 'offload more'}): {why}"
        logger.info("%s: %s", self.name, reason)
        return ThresholdDecision(new, old, reason)
