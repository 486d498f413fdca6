"""What the router knows of its workers, and the routing decision made from it.

A control loop polls every worker's ``/internal/state`` each ``control.interval_s``:
the prefix boundaries it holds (for cache-aware placement) and, from PrfaaS prefill
workers, kvwire's per-peer link metrics. Each PrfaaS cluster's egress goodput,
congestion signals and queue depth become one LinkSample per interval for its
ThresholdController (serving.policy), which raises t when the link nears its limits and
lowers it when idle; every change is logged with its reason and kept for /health.

The routing itself is serving.policy.route/place on these views: no I/O there.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import time
from dataclasses import dataclass, field

import aiohttp

from kvwire.metrics import PeerMetrics

from . import vllm_upstream
from .policy import (
    LinkSample,
    Placement,
    PrfaasCluster,
    Route,
    ThresholdController,
    WorkerView,
    egress_sample,
    place,
    route,
)
from .prefix_cache import PromptBlocks, prompt_blocks
from .router_config import PrfaasConfig, RouterConfig
from .worker_state import peers_from_json

log = logging.getLogger(__name__)

HISTORY = 50


@dataclass
class WorkerState:
    """One worker as last seen by the control loop, plus the router's own in-flight count.

    ``in_flight`` counts what the router has outstanding at the worker in its role: for a
    prefill worker the prefills (its queue), for a decode worker whole requests.
    """

    url: str
    blocks: frozenset[str] = frozenset()
    geometry: tuple[int, str] | None = None  # (block_tokens, salt) of its prefix cache
    peers: list[PeerMetrics] = field(default_factory=list)
    in_flight: int = 0
    error: str | None = None  # why its last poll failed (None: it answered)
    mismatch: str | None = None  # why its prefixes are ignored
    engine: str | None = None  # "kvwire" (a kvwire-serve worker) or "vllm" (an OpenAI server); None: not known yet
    waiting: float = 0.0  # requests queued at a vLLM server (its vllm:num_requests_waiting)

    @property
    def reachable(self) -> bool:
        return self.error is None

    def view(self, geometry: tuple[int, str] | None) -> WorkerView:
        held = self.blocks if geometry is not None and self.geometry == geometry else frozenset()
        return WorkerView(self.url, held, float(self.in_flight))


@dataclass
class ClusterState:
    """A PrfaaS cluster: its workers, threshold controller and last link sample."""

    config: PrfaasConfig
    controller: ThresholdController
    previous_peers: list[PeerMetrics] = field(default_factory=list)
    previous_time: float = 0.0
    last_sample: LinkSample | None = None
    changes: collections.deque = field(default_factory=lambda: collections.deque(maxlen=HISTORY))


@dataclass(frozen=True)
class Decision:
    """Where one request is prefilled and decoded, and what it reuses on each side."""

    route: Route
    decode: Placement
    decode_hash: str | None  # the decode worker's boundary the KV continues (None: from token 0)
    kv_address_override: str | None  # the decode KV address as reached from the PrfaaS cluster
    send_boundary: bool  # both workers keep prefixes of the same blocks: send the boundary states


class Fleet:
    """The router's view of local PD workers and PrfaaS clusters."""

    def __init__(self, config: RouterConfig):
        self.config = config
        urls = (*config.prefill_urls, *config.decode)
        self.workers = {url: WorkerState(url) for url in urls}
        self.clusters = {
            c.name: ClusterState(c, ThresholdController(c.threshold_config(), name=f"PrfaaS cluster {c.name}"))
            for c in config.prfaas
        }
        self.geometry: tuple[int, str] | None = None
        self.polls = 0

    # -- the control loop -----------------------------------------------------------------

    async def run(self, session: aiohttp.ClientSession) -> None:
        """Poll and step the controllers forever (cancel to stop)."""
        while True:
            started = time.monotonic()
            try:
                await self.poll(session)
            except Exception:  # the loop must outlive any one bad answer
                log.exception("router control loop: poll failed")
            await asyncio.sleep(max(0.0, self.config.control.interval_s - (time.monotonic() - started)))

    async def poll(self, session: aiohttp.ClientSession) -> None:
        """One round: every worker's state, then one LinkSample per PrfaaS cluster."""
        await asyncio.gather(*(self._poll_worker(session, w) for w in self.workers.values()))
        self.polls += 1
        now = time.monotonic()
        for cluster in self.clusters.values():
            self._step(cluster, now)

    async def _poll_worker(self, session: aiohttp.ClientSession, worker: WorkerState) -> None:
        timeout = aiohttp.ClientTimeout(total=max(1.0, 2 * self.config.control.interval_s))
        if worker.engine is None:
            try:
                worker.engine = self.config.engine if self.config.engine != "auto" else (
                    "vllm" if await vllm_upstream.is_vllm(session, worker.url, timeout) else "kvwire")
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                self._unreachable(worker, f"{type(exc).__name__}: {exc}")
                return
            log.info("worker %s is a %s", worker.url,
                     "vLLM server" if worker.engine == "vllm" else "kvwire-serve worker")
        if worker.engine == "vllm":
            await self._poll_vllm(session, worker, timeout)
            return
        try:
            async with session.get(worker.url + "/internal/state", timeout=timeout) as response:
                if response.status != 200:
                    raise ValueError(f"GET /internal/state answered HTTP {response.status}")
                state = await response.json()
            if not isinstance(state, dict):
                raise ValueError(f"GET /internal/state answered a {type(state).__name__}, not an object")
            cache = state.get("prefix_cache")
            geometry = (int(cache["block_tokens"]), str(cache["salt"])) if cache else None
            blocks = frozenset(state.get("prefix_blocks", ()))
            peers = [dataclasses.replace(p, peer=f"{worker.url}>{p.peer}") for p in peers_from_json(state.get("peers", []))]
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError, TypeError, AttributeError) as exc:
            self._unreachable(worker, str(exc) or type(exc).__name__)
            return
        self._answered(worker)
        worker.geometry, worker.blocks, worker.peers = geometry, blocks, peers
        if geometry is not None and self.geometry is None:
            self.geometry = geometry
        mismatch = None
        if geometry is not None and geometry != self.geometry:
            mismatch = f"prefix blocks of {geometry[0]} tokens / another model, unlike {self.geometry[0]}"
            if worker.mismatch != mismatch:
                log.warning("worker %s: %s: its prefixes are ignored", worker.url, mismatch)
        worker.mismatch = mismatch

    @staticmethod
    def _unreachable(worker: WorkerState, error: str) -> None:
        if worker.reachable:
            log.warning("worker %s: state unavailable (%s); not routing to it until it answers", worker.url, error)
        worker.error, worker.blocks = error, frozenset()

    @staticmethod
    def _answered(worker: WorkerState) -> None:
        if not worker.reachable:
            log.warning("worker %s answers again", worker.url)
        worker.error = None

    async def _poll_vllm(self, session: aiohttp.ClientSession, worker: WorkerState, timeout) -> None:
        """A vLLM server's kvwire link gauges and queue, from its Prometheus /metrics."""
        try:
            async with session.get(worker.url + "/metrics", timeout=timeout) as response:
                if response.status != 200:
                    raise ValueError(f"GET /metrics answered HTTP {response.status}")
                text = await response.text()
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
            self._unreachable(worker, str(exc) or type(exc).__name__)
            return
        self._answered(worker)
        worker.peers, worker.waiting = vllm_upstream.parse_metrics(text, worker.url)

    def _step(self, cluster: ClusterState, now: float) -> None:
        """One controller sample for ``cluster``; skipped (t holds) unless every worker answered,
        since a missing worker's bytes would read as an idle link, and its late ones as a burst."""
        workers = [self.workers[url] for url in cluster.config.prefill]
        if not all(w.reachable for w in workers):
            cluster.previous_time = 0.0  # start the next sample afresh
            return
        peers = [p for w in workers for p in w.peers]
        if cluster.previous_time:
            queued = sum(max(w.in_flight, w.waiting) for w in workers) - len(workers)  # beyond one running per worker
            sample = egress_sample(cluster.previous_peers, peers, now - cluster.previous_time,
                                   cluster.config.egress_gbps * 1e9, max(0, queued))
            cluster.last_sample = sample
            decision = cluster.controller.observe(sample)
            if decision.changed:
                cluster.changes.append({"at": time.time(), "t": decision.threshold_tokens, "reason": decision.reason})
        cluster.previous_peers, cluster.previous_time = peers, now

    # -- routing --------------------------------------------------------------------------

    def blocks(self, token_ids: list[int]) -> PromptBlocks:
        if self.geometry is None:
            return PromptBlocks(len(token_ids), 1, ())
        block_tokens, salt = self.geometry
        return prompt_blocks(token_ids, block_tokens, salt.encode())

    def decide(self, token_ids: list[int]) -> Decision:
        """Where to prefill and decode one request, from the last poll's views."""
        blocks = self.blocks(token_ids)
        views = {url: w.view(self.geometry) for url, w in self.workers.items()}

        def answering(urls, keep_all: bool):
            alive = [views[u] for u in urls if self.workers[u].reachable]
            return alive or ([views[u] for u in urls] if keep_all else [])

        # A PrfaaS cluster none of whose workers answers is skipped; a local pool is kept
        # whole (its failures then surface on the request, with the fallback).
        clusters = [PrfaasCluster(name, c.controller.threshold_tokens, tuple(answering(c.config.prefill, False)))
                    for name, c in self.clusters.items()]
        chosen = route(blocks, answering(self.config.prefill, True), clusters)
        decode = place(blocks, answering(self.config.decode, True))
        num_blocks = decode.cached_tokens // blocks.block_tokens if blocks.hashes else 0
        override = None
        if chosen.cluster is not None:
            override = self.clusters[chosen.cluster].config.kv_addresses.get(decode.worker)
        return Decision(
            route=chosen, decode=decode, decode_hash=blocks.hashes[num_blocks - 1] if num_blocks else None,
            kv_address_override=override,
            send_boundary=self.geometry is not None and all(
                self.workers[url].geometry == self.geometry for url in (decode.worker, chosen.placement.worker)),
        )

    def acquire(self, *urls: str) -> None:
        for url in urls:
            self.workers[url].in_flight += 1

    def release(self, *urls: str) -> None:
        for url in urls:
            self.workers[url].in_flight -= 1

    def unavailable(self) -> str | None:
        """Why the router cannot serve now (no prefill or no decode worker answers), or None."""
        problems = []
        for role, urls in (("prefill", self.config.prefill_urls), ("decode", self.config.decode)):
            if not any(self.workers[url].reachable for url in urls):
                errors = "; ".join(f"{url}: {self.workers[url].error}" for url in urls)
                problems.append(f"no {role} worker is reachable ({errors})")
        return "; ".join(problems) or None

    def health(self) -> dict:
        return {
            "thresholds": {
                name: {"threshold_tokens": c.controller.threshold_tokens, "egress_gbps": c.config.egress_gbps,
                       "last_sample": dataclasses.asdict(c.last_sample) if c.last_sample else None,
                       "changes": list(c.changes)}
                for name, c in self.clusters.items()
            },
            "prefix_block_tokens": self.geometry[0] if self.geometry else None,
            "workers": {url: {"prefix_blocks": len(w.blocks), "in_flight": w.in_flight, "reachable": w.reachable,
                              "error": w.error, "prefixes_ignored": w.mismatch}
                        for url, w in self.workers.items()},
            "polls": self.polls,
        }
