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

from . import protocol, vllm_upstream
from .errors import BadRequest, NotAWorker, PairRefused
from .identify import Identity, identify
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

log = logging.getLogger(__name__)

HISTORY = 50
UNREACHED = frozenset({"PeerLostError", "TransferTimeout"})  # a probe that got no answer, not a wrong one
PROBE_EVERY_S = 10.0  # a pair's KV handshake is checked again this often (and when either side changes)



@dataclass
class PairCheck:
    """Whether one prefill worker can send KV to one decode worker, as last checked."""

    key: tuple  # what it was checked for: both identities and the KV address
    checked_at: float
    problem: tuple[str, str] | None  # (error type, message); None: it can
    from_request: bool = False  # a request's transfer was refused: held until checked again


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
    engine: str | None = None  # "kvwire" (a kvwire-serve worker), "vllm" or "vllm-nixl" (an OpenAI server); None: unknown
    identity: Identity | None = None  # what it last said it is
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
    kv_address: str | None  # the decode worker's KV address as the prefill worker dials it (None: not known)
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
        self.pairs: dict[tuple[str, str], PairCheck] = {}
        self._probes: dict[tuple[str, str], asyncio.Task] = {}

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
        self.check_pairs(session)
        now = time.monotonic()
        for cluster in self.clusters.values():
            self.step(cluster, now)

    async def _poll_worker(self, session: aiohttp.ClientSession, worker: WorkerState) -> None:
        timeout = aiohttp.ClientTimeout(total=max(1.0, 2 * self.config.control.interval_s))
        try:
            identity, metrics = await identify(session, worker.url, timeout, nixl=self.config.engine == "vllm-nixl")
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            self._unreachable(worker, f"{type(exc).__name__}: {exc}")
            return
        except NotAWorker as exc:
            self._unreachable(worker, str(exc))
            return
        role = self.role_of(worker.url)
        if not identity.serves(role):
            self._unreachable(worker, f"it is {identity.describe()}, not a {role} worker")
            return
        if self.config.engine != "auto" and identity.engine != self.config.engine:
            self._unreachable(worker, f"it is {identity.describe()}, but the router was told --engine "
                                      f"{self.config.engine}")
            return
        if worker.engine is None:
            log.info("worker %s is %s", worker.url, identity.describe())
        worker.engine, worker.identity = identity.engine, identity
        if identity.is_vllm:  # its kvwire link gauges and queue, from the /metrics identify read
            self._answered(worker)
            worker.peers, worker.waiting = vllm_upstream.parse_metrics(metrics, worker.url)
            return
        try:
            async with session.get(worker.url + "/internal/state", timeout=timeout) as response:
                if response.status != 200:
                    raise ValueError(f"GET /internal/state answered HTTP {response.status}")
                state = protocol.decode(await response.read(), protocol.WorkerState)  # BadRequest: a ValueError
            cache = state.prefix_cache
            geometry = (cache.block_tokens, cache.salt) if cache is not None else None
            blocks = frozenset(state.prefix_blocks)
            peers = [dataclasses.replace(p, peer=f"{worker.url}>{p.peer}") for p in state.peers]
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
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

    def role_of(self, url: str) -> str:
        return "decode" if url in self.config.decode else "prefill"

    # -- can each prefill worker send KV to each decode worker? ----------------------------

    def kv_address_for(self, prefill_url: str, decode_url: str) -> str | None:
        """The decode worker's KV address as ``prefill_url`` dials it: a PrfaaS cluster's
        ``kv_addresses`` entry, the router's ``decode_kv``, or what the worker reports."""
        for cluster in self.clusters.values():
            if prefill_url in cluster.config.prefill and decode_url in cluster.config.kv_addresses:
                return cluster.config.kv_addresses[decode_url]
        if decode_url in self.config.decode_kv:
            return self.config.decode_kv[decode_url]
        identity = self.workers[decode_url].identity
        return identity.kv_address if identity else None

    def check_pairs(self, session: aiohttp.ClientSession) -> None:
        """Compare every answering (prefill, decode) pair's identities; probe the KV handshake
        of kvwire-serve pairs (through the prefill worker) when new, changed or due."""
        now = time.monotonic()
        for prefill_url in self.config.prefill_urls:
            for decode_url in self.config.decode:
                prefill, decode = self.workers[prefill_url], self.workers[decode_url]
                pair = (prefill_url, decode_url)
                if not (prefill.reachable and decode.reachable and prefill.identity and decode.identity):
                    continue  # unreachable workers are reported as such; their pair is checked once they answer
                address = self.kv_address_for(prefill_url, decode_url)
                key = (prefill.identity, decode.identity, address)
                problem = pair_mismatch(prefill.identity, decode.identity, prefill_url, decode_url, address)
                check = self.pairs.get(pair)
                if problem is None and prefill.engine != "kvwire" and check is not None and check.from_request \
                        and now - check.checked_at < PROBE_EVERY_S:
                    continue  # nothing to probe a vLLM pair with: a refused push holds for a while
                if problem is not None or prefill.engine != "kvwire":
                    self._record(pair, PairCheck(key, now, problem))
                    continue
                due = check is None or check.key != key or now - check.checked_at > PROBE_EVERY_S
                if due and pair not in self._probes:
                    self._probes[pair] = asyncio.create_task(self._probe(session, pair, key, address))

    async def _probe(self, session: aiohttp.ClientSession, pair: tuple[str, str], key: tuple, address: str) -> None:
        prefill_url, decode_url = pair
        timeout = aiohttp.ClientTimeout(total=self.config.connect_timeout_s * 2 + 1)
        job = protocol.ProbeRequest(kv_address=address, timeout_s=self.config.connect_timeout_s)
        try:
            async with session.post(prefill_url + "/internal/probe", data=protocol.encode(job),
                                    headers={"Content-Type": "application/json"}, timeout=timeout) as response:
                data = await response.read()
            try:
                error = protocol.decode(data, protocol.ProbeResult).error
            except BadRequest as exc:  # an old or foreign worker's answer: a problem, named
                error = protocol.ErrorInfo(type="ProtocolError", message=f"/internal/probe answered wrongly: {exc}")
            problem = None
            if error is not None:
                message = f"prefill worker {prefill_url} cannot send KV to decode worker {decode_url} at {address}"
                problem = (error.type, f"{message}: {error.message}")
            self._record(pair, PairCheck(key, time.monotonic(), problem))
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
            pass  # the prefill worker's own poll reports it; probe again next round
        finally:
            self._probes.pop(pair, None)

    def _record(self, pair: tuple[str, str], check: PairCheck) -> None:
        before = self.pairs.get(pair)
        if check.problem != (before.problem if before else None):
            if check.problem:
                log.error("%s", check.problem[1])
            elif before is not None:
                log.warning("prefill worker %s can send KV to decode worker %s again", *pair)
        self.pairs[pair] = check

    def refuse_pair(self, prefill_url: str, decode_url: str, error_type: str, message: str) -> None:
        """A request's transfer was refused for a misconfiguration: refuse the pair until a probe says otherwise."""
        check = self.pairs.get((prefill_url, decode_url))
        self._record((prefill_url, decode_url), PairCheck(check.key if check else (), time.monotonic(),
                                                          (error_type, message), from_request=True))

    async def settle(self) -> None:
        """Wait for the pair probes under way (at start, so the first /health already says)."""
        if self._probes:
            await asyncio.gather(*list(self._probes.values()), return_exceptions=True)

    def max_model_len(self) -> int | None:
        """The longest request every worker that said so can hold (None: none said)."""
        limits = [w.identity.max_model_len for w in self.workers.values() if w.identity and w.identity.max_model_len]
        return min(limits) if limits else None

    def broken(self, prefill_url: str, decode_url: str) -> tuple[str, str] | None:
        """Why requests must not go to this pair (None: they may). A KV address that cannot be
        reached degrades /health but is still tried while the decode worker may recompute
        (kv_fallback "recompute"); a misconfiguration never is."""
        check = self.pairs.get((prefill_url, decode_url))
        if check is None or check.problem is None:
            return None
        if check.problem[0] in UNREACHED and self.config.kv_fallback == "recompute":
            return None
        return check.problem

    def step(self, cluster: ClusterState, now: float) -> None:
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
        # A decode worker no prefill worker can send KV to is a last resort; then only the
        # prefill workers that can send to the chosen one are candidates.
        prefill_urls = self.config.prefill_urls
        decodes = answering(self.config.decode, True)
        decode = place(blocks, [v for v in decodes if any(not self.broken(p, v.name) for p in prefill_urls)] or decodes)

        def pairable(views):
            return [v for v in views if not self.broken(v.name, decode.worker)]

        local = pairable(answering(self.config.prefill, True))
        clusters = [PrfaasCluster(name, c.controller.threshold_tokens, tuple(pairable(answering(c.config.prefill, False))))
                    for name, c in self.clusters.items()]
        if not local and not any(c.workers for c in clusters):
            problems = [problem for p in prefill_urls if (problem := self.broken(p, decode.worker))]
            if problems:
                raise PairRefused(problems[0][0], "; ".join(message for _, message in problems))
        chosen = route(blocks, local, clusters)
        num_blocks = decode.cached_tokens // blocks.block_tokens if blocks.hashes else 0
        return Decision(
            route=chosen, decode=decode, decode_hash=blocks.hashes[num_blocks - 1] if num_blocks else None,
            kv_address=self.kv_address_for(chosen.placement.worker, decode.worker),
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
        problems += [check.problem[1] for check in self.pairs.values() if check.problem]
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
                              "error": w.error, "prefixes_ignored": w.mismatch,
                              "is": w.identity.describe() if w.identity else None}
                        for url, w in self.workers.items()},
            "pairs": {f"{p} -> {d}": check.problem[1] if check.problem else "ok"
                      for (p, d), check in self.pairs.items()},
            "polls": self.polls,
        }


def pair_mismatch(prefill: Identity, decode: Identity, prefill_url: str, decode_url: str,
             address: str | None) -> tuple[str, str] | None:
    """Why KV from ``prefill`` cannot serve ``decode`` as far as their own reports tell: another
    engine, model, dtype or KV layout, or no KV address known (None: no reason)."""
    pair = f"prefill worker {prefill_url} cannot send KV to decode worker {decode_url}"
    if prefill.engine != decode.engine:
        return "misconfigured", f"{pair}: one is {prefill.describe()}, the other {decode.describe()}"
    if prefill.is_vllm:
        if prefill.model != decode.model:
            return "LayoutMismatchError", f"{pair}: they serve other models ({prefill.model!r} and {decode.model!r})"
    else:
        for what, theirs in (("architecture", (prefill.architecture, decode.architecture)),
                             ("dtype", (prefill.dtype, decode.dtype)),
                             ("KV layout fingerprint", (prefill.layout_fingerprint, decode.layout_fingerprint))):
            if theirs[0] != theirs[1]:
                return "LayoutMismatchError", (f"{pair}: {what} {theirs[0]} and {theirs[1]} differ "
                                               f"({prefill.architecture}, {prefill.dtype} vs {decode.architecture}, "
                                               f"{decode.dtype})")
    if address is None and prefill.engine != "vllm-nixl":  # NIXL's decode server pulls: no address to give
        return "misconfigured", (f"{pair}: the decode worker's kvwire address is not known (a vLLM decode server "
                                 "whose connector listens on port 0, or publishes no vllm:kvwire_info): give "
                                 "--decode-kv URL=HOST:PORT")
    return None
