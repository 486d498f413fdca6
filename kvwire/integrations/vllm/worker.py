"""The connector's worker half: kvwire Senders on a prefill instance, a Receiver on a
decode instance, and the copies between vLLM's blocks and the wire.

Prefill: a decode address is dialled when a request to push first appears, so the
handshake overlaps the prefill; in the step where the prefill completes each
full-attention layer is gathered and handed to kvwire from ``save_kv_layer``, right
after that layer computed (its bytes travel while later layers compute), and the
linear-attention states from ``wait_for_save`` once the step is done. Sends copy, so the
request's blocks are free again when it finishes; the transfer is finished (verified by
the receiver) in a background thread.

Tensor parallelism: every rank of a decode instance publishes the instance (its TP size,
its ranks' addresses, the model's whole-tensor geometry) to probes of its kvwire address.
A prefill rank probes the decode address once; with the same TP it pushes to the decode
rank of its own number, with another TP it sends each decode rank that needs some of its
shard just those pieces (``topology``), under ``<kvwire id>/<prefill rank>``, in a piece
layout the decode rank accepts. A model or TP that cannot pair is refused there, before
any push.

Decode: the Receiver takes pushes whenever they come. A load waits (without blocking the
engine: it is polled in ``get_transfer_results``) for its request to be opened and every
layer verified, then copies the tokens by position into this instance's blocks and the
state into its state slot, and only then reports the request finished. Any failure
(integrity, a dead prefill instance, a deadline, a refused push) fails that request only,
through ``failed_recving``, and vLLM's ``kv_load_failure_policy`` decides what follows.

Why it is long: vLLM hands one worker object both roles (a rank may push and load in one
step), so the push and the load paths live in one class; their pieces (cache layouts and
copies, TP topology, transfer params) are in cache.py, topology.py and params.py.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from dataclasses import dataclass, field

import msgspec
import numpy as np

from ... import (
    KVWireError,
    LayoutMismatchError,
    PeerLostError,
    Receiver,
    RemoteProtocolError,
    Sender,
    TransferTimeout,
)
from ... import probe as probe_receiver
from ...address import format_address, parse_address
from . import topology
from .cache import AttentionLayer, CacheLayout, to_torch
from .config import ConnectorConfig
from .scheduler import LoadPlan, SendPlan, StepPlan
from .stats import KVWireStats

log = logging.getLogger(__name__)


class PushFailed(KVWireError):
    """The prefill side could not push this request (it says why in its response)."""


def rank_address(address: str, rank: int) -> str:
    """Tensor-parallel rank r of a decode instance listens on its ``listen`` port + r (and
    publishes every rank's address, so prefill ranks need not know this rule)."""
    host, port = parse_address(address)
    return format_address(host, port + rank)


def reachable(published: list[str], probed: str) -> list[str]:
    """Each decode rank's address as this prefill rank dials it. Rank 0 is the address the
    prefill side was given (it may be a relay, a NAT or a proxy in front of the published
    one); ranks on rank 0's host are reached at the same port offsets from it; a rank
    published on another host is dialled as published."""
    host, port = parse_address(probed)
    first_host, first_port = parse_address(published[0])
    out = []
    for address in published:
        rank_host, rank_port = parse_address(address)
        same_host = rank_host == first_host or rank_host in ("0.0.0.0", "::", "")
        out.append(format_address(host, port + rank_port - first_port) if same_host else address)
    return out


@dataclass
class _Route:
    """Where this prefill rank's pushes to one decode instance go: a Sender per decode
    rank it sends to, and whether they hold the same TP (whole shards, plain ids)."""

    senders: dict[int, Sender]
    decode_tp: int
    same_tp: bool

    def close(self) -> None:
        for sender in self.senders.values():
            sender.close()


@dataclass
class _Push:
    plan: SendPlan
    route: _Route
    transfers: dict  # decode rank -> Transfer
    sent: set = field(default_factory=set)

    def ended(self) -> bool:
        now = time.monotonic()
        return all(t.done or t.error is not None or now > t.deadline for t in self.transfers.values()) or any(
            t.error is not None for t in self.transfers.values())

    def abort(self, reason: str) -> None:
        for transfer in self.transfers.values():
            transfer.abort(reason)


@dataclass
class _Load:
    plan: LoadPlan
    started_monotonic: float
    handles: dict = field(default_factory=dict)  # kvwire request id -> ReceivedRequest


class ConnectorWorker:
    def __init__(self, config: ConnectorConfig, vllm_config, kv_cache_config, role: str):
        self.config = config
        self.role = role
        self.kv_cache_config = kv_cache_config
        self.forward_context = vllm_config.compilation_config.static_forward_context
        self.rank = _tp_rank(vllm_config)
        self.tp_size = vllm_config.parallel_config.tensor_parallel_size
        self.hf_config = vllm_config.model_config.hf_config
        self.geometry: topology.Geometry | None = None
        self.secret = config.secret()
        self.cache: CacheLayout | None = None
        self.layer_of: dict[str, int] = {}
        self.receiver: Receiver | None = None
        self._senders: dict[str, concurrent.futures.Future] = {}
        self._pool = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="kvwire-vllm")
        self._pushes: list[_Push] = []  # opened this step
        self._in_flight: list[_Push] = []  # handed to kvwire, not yet verified
        self._in_flight_cv = threading.Condition()
        threading.Thread(target=self._watch_in_flight, name="kvwire-vllm-pushes", daemon=True).start()
        self._loads: dict[str, _Load] = {}
        self._lock = threading.Lock()
        self._stats = KVWireStats()
        self._outcomes: dict[str, tuple[bool, str | None, int, float]] = {}  # for the scheduler
        self._unpairable: dict[str, str] = {}  # decode addresses refused at the probe, for the scheduler

    # -- set-up ----------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches) -> None:
        caches = {name: self.forward_context[name].kv_cache for name in kv_caches}
        self.cache = CacheLayout.build(self.kv_cache_config, caches)
        self.layer_of = {layer.name: i for i, layer in enumerate(self.cache.layers)}
        log.info("kvwire layout %s: %s", self.cache.layout.fingerprint, self.cache.names())
        self.geometry = topology.geometry_of(self.cache.layout, self.cache.kinds(), self.hf_config, self.tp_size)
        if self.role in ("kv_consumer", "kv_both"):
            listen = rank_address(self.config.listen, self.rank)
            if self.tp_size > 1 and parse_address(listen)[1] == self.rank:
                raise ValueError("KVWireConnector: kv_connector_extra_config['listen'] needs a port (not 0) with "
                                 "tensor_parallel_size > 1: rank r listens on its port + r and publishes the others'")
            ranks = [rank_address(self.config.listen, r) for r in range(self.tp_size)]
            instance = topology.DecodeInstance(self.tp_size, ranks, self.geometry, self.cache.block_size())
            try:
                self.receiver = Receiver(
                    self.cache.layout, listen, backend=self.config.backend, secret=self.secret,
                    ssl_context=self.config.server_tls(), max_bytes=self.config.max_receive_mib << 20,
                    max_request_timeout_s=max(self.config.transfer_timeout_s, 1.0),
                    claim_timeout_s=self.config.lease_s,
                    also_accepted=topology.accepted_layouts(self.geometry, self.tp_size, self.rank),
                    info=msgspec.msgpack.encode(instance), verify=self.config.verify,
                )
            except OSError as exc:
                raise OSError(exc.errno, f"KVWireConnector: kv_connector_extra_config['listen'] "
                                         f"(rank {self.rank}): {exc.strerror}") from None
            log.info("kvwire receiver (rank %d) listening on %s", self.rank, self.receiver.address)

    def shutdown(self) -> None:
        for future in self._senders.values():
            if future.done() and future.exception() is None:
                future.result().close()
        if self.receiver is not None:
            self.receiver.close()
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- prefill side ----------------------------------------------------------------------

    def _route(self, address: str) -> concurrent.futures.Future:
        future = self._senders.get(address)
        if future is None or (future.done() and future.exception() is not None):
            future = self._senders[address] = self._pool.submit(self._connect, address)
        return future

    def _connect(self, address: str) -> _Route:
        """Probe the decode instance at ``address``, check that this rank can pair with
        it, and dial the decode ranks this rank sends to."""
        info = probe_receiver(address, backend=self.config.backend, secret=self.secret,
                              ssl_context=self.config.client_tls(), timeout=self.config.connect_timeout_s)
        try:
            decode = msgspec.msgpack.decode(info, type=topology.DecodeInstance)
        except msgspec.DecodeError as exc:
            raise RemoteProtocolError(f"the kvwire receiver at {address} does not describe a decode instance "
                                f"(is it a KVWireConnector kv_consumer of this version?): {exc}") from None
        ranks = reachable(decode.ranks, address)
        prefill_tp, decode_tp = self.tp_size, decode.tp_size
        if decode_tp == prefill_tp:
            return _Route({self.rank: self._dial(self.cache.layout, ranks[self.rank])}, decode_tp, True)
        where = f"the decode instance at {address} (TP {decode_tp}) and this prefill instance (TP {prefill_tp})"
        unsharded = self.geometry.unsharded()
        if unsharded:
            raise LayoutMismatchError(f"{where}: kvwire does not know how vLLM shards {unsharded[0]} across ranks, "
                                      "so it pairs only instances of the same tensor-parallel size")
        difference = self.geometry.difference(decode.geometry, self.cache.names())
        if difference is not None:
            raise LayoutMismatchError(f"{where} hold another model: {difference}")
        try:
            self.geometry.check_tp(decode_tp)
        except ValueError as exc:
            raise LayoutMismatchError(f"{where} cannot pair: {exc}") from None
        senders: dict[int, Sender] = {}
        try:
            for target in topology.targets_of(self.geometry, prefill_tp, self.rank, decode_tp):
                layout = topology.piece_layout(self.geometry, prefill_tp, self.rank, decode_tp, target)
                senders[target] = self._dial(layout, ranks[target])
        except BaseException:
            _Route(senders, decode_tp, False).close()
            raise
        log.info("kvwire: prefill rank %d/%d sends decode ranks %s of %s their pieces", self.rank, prefill_tp,
                 sorted(senders), address)
        return _Route(senders, decode_tp, False)

    def _dial(self, layout, address: str) -> Sender:
        try:
            return Sender(
                layout, address, backend=self.config.backend, streams=self.config.streams,
                secret=self.secret, ssl_context=self.config.client_tls(), timeout=self.config.connect_timeout_s,
                verify=self.config.verify,
            )
        except LayoutMismatchError as exc:
            raise LayoutMismatchError(f"{exc} (kvwire layers here: {self.cache.names()})") from None

    def start_load_kv(self, plan: StepPlan) -> None:
        for address in plan.connect:
            self._route(address)
        for send in plan.sends:
            self._open(send)
        for kvwire_id, prefill_tp in plan.releases:
            self._drop_load(kvwire_id, prefill_tp)
        for load in plan.loads:
            self._loads[load.req_id] = _Load(load, time.monotonic())

    def _open(self, send: SendPlan) -> None:
        transfers = {}
        try:
            route = self._route(send.address).result(timeout=self.config.connect_timeout_s)
            for target, sender in route.senders.items():
                kvwire_id = send.kvwire_id if route.same_tp else f"{send.kvwire_id}/{self.rank}"
                transfers[target] = sender.open(kvwire_id, send.num_tokens, codec=self.config.codec,
                                                timeout=self.config.transfer_timeout_s)
        except concurrent.futures.TimeoutError:
            self._send_failed(send, TransferTimeout(f"no connection to {send.address} within "
                                                    f"{self.config.connect_timeout_s}s"))
            return
        except (KVWireError, ValueError, OSError) as exc:
            for transfer in transfers.values():
                transfer.abort(f"{type(exc).__name__}: {exc}")
            if isinstance(exc, PeerLostError):  # the decode instance went away since we dialled
                stale = self._senders.pop(send.address, None)  # dial afresh next time
                if stale is not None and stale.done() and stale.exception() is None:
                    stale.result().close()
            if isinstance(exc, LayoutMismatchError):
                self._unpairable[send.address] = f"{type(exc).__name__}: {exc}"
            self._send_failed(send, exc)
            return
        self._pushes.append(_Push(send, route, transfers))

    def _send_failed(self, send: SendPlan, error: BaseException) -> None:
        log.error("kvwire: pushing request %s (%s) to %s failed: %s: %s", send.req_id, send.kvwire_id,
                  send.address, type(error).__name__, error)
        with self._lock:
            self._stats.record_failure("failed_sends", error)

    def save_kv_layer(self, layer_name: str) -> None:
        index = self.layer_of.get(layer_name)
        if index is None or not self._pushes:
            return
        self._send_layers([index])

    def _send_layers(self, indices: list[int]) -> None:
        """Hand ``indices`` (those not sent yet) of every push to its transfers, in one call
        each: layers handed over together travel together (small ones in one frame)."""
        for push in list(self._pushes):
            todo = [index for index in indices if index not in push.sent]
            if not todo:
                continue
            push.sent.update(todo)
            try:
                gathered = {index: self._gather(push, index) for index in todo}
                for target, transfer in push.transfers.items():
                    transfer.send_layers({index: self._shard_for(push.route, target, index, tensors)
                                          for index, tensors in gathered.items()})
            except (KVWireError, ValueError) as exc:
                self._pushes.remove(push)
                push.abort(f"{type(exc).__name__}: {exc}")
                self._send_failed(push.plan, exc)

    def _gather(self, push: _Push, index: int) -> dict:
        """Layer ``index`` of ``push``'s request, out of this rank's cache."""
        layer = self.cache.layers[index]
        if isinstance(layer, AttentionLayer):
            return layer.gather(push.plan.block_ids[self.cache.groups[index]], push.plan.num_tokens)
        return layer.gather(self.cache.state_slot(push.plan.block_ids, self.cache.groups[index]))

    def _shard_for(self, route: _Route, target: int, index: int, tensors: dict) -> dict:
        """What decode rank ``target`` gets of this rank's layer ``index``: all of it with
        the same TP, else its pieces."""
        if route.same_tp:
            return tensors
        return topology.select(tensors, self.geometry.layers[index], self.tp_size, self.rank, route.decode_tp, target)

    def wait_for_save(self) -> None:
        """The step is done: send what ``save_kv_layer`` did not (states), then let the
        transfers finish in the background."""
        if self.cache is not None and self._pushes:
            self._send_layers(list(range(len(self.cache.layers))))
        pushes, self._pushes = self._pushes, []
        with self._in_flight_cv:
            self._in_flight.extend(pushes)
            self._in_flight_cv.notify()

    def _watch_in_flight(self) -> None:
        """One thread sees every push to its end (verified, or failed with its error):
        a thread per push would not be bounded, a pool could be filled by slow ones."""
        while True:
            with self._in_flight_cv:
                self._in_flight_cv.wait_for(lambda: self._in_flight, timeout=None)
                pushes = list(self._in_flight)
            ended = [push for push in pushes if push.ended()]
            for push in ended:
                self._finish(push)
            with self._in_flight_cv:
                self._in_flight = [push for push in self._in_flight if push not in ended]
            time.sleep(0.005)

    def _finish(self, push: _Push) -> None:
        try:  # ended: each returns its stats or raises its error at once
            failed_first = sorted(push.transfers.values(), key=lambda transfer: transfer.error is None)
            stats = [transfer.finish(timeout=0) for transfer in failed_first]
        except KVWireError as exc:
            push.abort(f"{type(exc).__name__}: {exc}")  # the load fails on the decode side anyway
            self._send_failed(push.plan, exc)
            return
        with self._lock:
            self._stats.data["sent_requests"] += 1
            self._stats.record_transfer(sum(s.wire_bytes for s in stats), max(s.seconds for s in stats))

    # -- decode side -----------------------------------------------------------------------

    def _push_ids(self, kvwire_id: str, prefill_tp: int | None) -> dict[str, int | None]:
        """The pushes this rank takes for one request: {kvwire id: prefill rank}, the rank
        None where the prefill instance has this TP (one push of this rank's whole shard)."""
        if prefill_tp is None or prefill_tp == self.tp_size:
            return {kvwire_id: None}
        if self.geometry.unsharded():
            return {}  # no push can come (the prefill side refused to pair)
        sources = topology.sources_of(self.geometry, prefill_tp, self.tp_size, self.rank)
        return {f"{kvwire_id}/{source}": source for source in sources}

    def _drop_load(self, kvwire_id: str, prefill_tp: int | None) -> None:
        for req_id, load in list(self._loads.items()):
            if load.plan.kvwire_id == kvwire_id:
                del self._loads[req_id]
        if self.receiver is not None:
            for push_id in self._push_ids(kvwire_id, prefill_tp):
                self.receiver.release(push_id)

    def poll_loads(self) -> tuple[set[str], set[str]]:
        """(finished, failed) loads: polled every step, never blocking on the network."""
        finished, failed = set(), set()
        for req_id, load in list(self._loads.items()):
            try:
                done = self._try_land(load)
            except Exception as exc:  # noqa: BLE001 - any failure fails this request only
                self._load_failed(load, exc)
                failed.add(req_id)
                done = True
            if done:
                finished.add(req_id)
                del self._loads[req_id]
        return finished, failed

    def _not_pushed(self, load: _Load, push_id: str) -> TransferTimeout:
        plan = load.plan
        refusals = self.receiver.refusals(since=load.started_monotonic - self.config.transfer_timeout_s)
        refused = "".join(f"; meanwhile this receiver refused {peer}: {type(error).__name__}: {error}"
                          for peer, error in refusals[-2:])
        if any(isinstance(error, LayoutMismatchError) for _, error in refusals):
            refused += f" (kvwire layers here: {self.cache.names()})"
        where = ""
        if plan.address and parse_address(rank_address(plan.address, self.rank))[1] != parse_address(
                self.receiver.address)[1]:
            where = (f"; the prefill request named {plan.address} as its decode address, this "
                     f"instance's rank {self.rank} listens at {self.receiver.address}")
        return TransferTimeout(f"no prefill instance pushed request {push_id!r} within "
                               f"{self.config.load_timeout_s}s (load_timeout_s){refused}{where}")

    def _try_land(self, load: _Load) -> bool:
        plan = load.plan
        if plan.error:
            raise PushFailed(f"the prefill instance reported: {plan.error}")
        waited = time.monotonic() - load.started_monotonic
        push_ids = self._push_ids(plan.kvwire_id, plan.prefill_tp)
        if not push_ids:
            raise LayoutMismatchError(
                f"a prefill instance of TP {plan.prefill_tp} cannot push to this one (TP {self.tp_size}): kvwire does "
                f"not know how vLLM shards {self.geometry.unsharded()[0]} across ranks")
        for push_id in push_ids:
            if push_id in load.handles:
                continue
            try:
                handle = load.handles[push_id] = self.receiver.wait(push_id, timeout=0)
            except TransferTimeout:
                if waited > self.config.load_timeout_s:
                    raise self._not_pushed(load, push_id) from None
                return False
            if handle.num_tokens != plan.num_tokens:
                raise ValueError(f"the push of {push_id!r} holds {handle.num_tokens} tokens, this request "
                                 f"needs {plan.num_tokens}")
        for push_id, handle in load.handles.items():
            if handle.error is not None:
                raise handle.error
            if not handle.done:
                if waited > self.config.load_timeout_s + self.config.transfer_timeout_s:
                    raise TransferTimeout(f"request {push_id!r} did not complete in time")
                return False
        try:  # the received arrays are the receiver's memory: released once landed (or failed)
            received = {push_ids[push_id]: handle.wait_all(timeout=0) for push_id, handle in load.handles.items()}
            if None in received:
                layers = received[None]
            else:  # this rank's shard, joined from the prefill ranks' pieces
                layers = [topology.assemble({source: got[index] for source, got in received.items()},
                                            self.geometry.layers[index], plan.prefill_tp, self.tp_size, self.rank,
                                            plan.num_tokens) for index in range(len(self.cache.layers))]
            self.land(plan, layers)
            nbytes = sum(np.asarray(a).nbytes for got in received.values() for layer in got for a in layer.values())
        finally:
            for handle in load.handles.values():
                handle.release()
        seconds = time.monotonic() - load.started_monotonic
        with self._lock:
            self._stats.data["loaded_requests"] += 1
            self._stats.data["loaded_tokens"] += plan.num_tokens - plan.first
            self._stats.record_transfer(nbytes, seconds)
        self._outcomes[plan.req_id] = (True, None, nbytes, seconds)
        return True

    def land(self, plan: LoadPlan, layers: list[dict]) -> None:
        """Copy a verified push (every layer's tensors) into this engine's blocks."""
        for index, tensors in enumerate(layers):
            self.land_layer(plan, index, tensors)

    def land_layer(self, plan: LoadPlan, index: int, tensors: dict) -> None:
        layer, group = self.cache.layers[index], self.cache.groups[index]
        if isinstance(layer, AttentionLayer):
            dtype = layer.cache.dtype
            torch_tensors = {n: to_torch(a, dtype).to(layer.cache.device) for n, a in tensors.items()}
            layer.scatter(plan.block_ids[group], plan.first, plan.num_tokens, torch_tensors)
        else:
            torch_tensors = {n: to_torch(tensors[n], v.dtype).to(v.device) for n, v in zip(layer.names, layer.views)}
            layer.scatter(self.cache.state_slot(plan.block_ids, group), torch_tensors)

    def _load_failed(self, load: _Load, error: BaseException) -> None:
        plan = load.plan
        text = f"{type(error).__name__}: {error}"
        log.error("kvwire: loading request %s (%s) failed: %s", plan.req_id, plan.kvwire_id, text)
        if self.receiver is not None:
            for push_id in self._push_ids(plan.kvwire_id, plan.prefill_tp):
                self.receiver.release(push_id)
        with self._lock:
            self._stats.record_failure("failed_loads", error)
        self._outcomes[plan.req_id] = (False, text, 0, time.monotonic() - load.started_monotonic)

    # -- reporting -------------------------------------------------------------------------

    def take_outcomes(self) -> tuple[dict[str, tuple[bool, str | None, int, float]], dict[str, str]]:
        outcomes, self._outcomes = self._outcomes, {}
        unpairable, self._unpairable = self._unpairable, {}
        return outcomes, unpairable

    def take_stats(self) -> KVWireStats | None:
        with self._lock:
            links = {}
            peers = dict(self.receiver.metrics()) if self.receiver is not None else {}
            for future in self._senders.values():
                if future.done() and future.exception() is None:
                    for sender in future.result().senders.values():
                        metrics = sender.metrics()
                        peers[metrics.peer] = metrics
            for peer, metrics in peers.items():
                if metrics.links:
                    links[peer] = {"rtt_ms": metrics.rtt_ms, "retransmits": metrics.retransmits,
                                   "goodput_bps": metrics.goodput_bps, "bytes": metrics.bytes}
            self._stats.data["links"] = links
            if self._stats.is_empty():
                return None
            stats, self._stats = self._stats, KVWireStats()
            return stats


def _tp_rank(vllm_config) -> int:
    if vllm_config.parallel_config.tensor_parallel_size <= 1:
        return 0
    from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

    return get_tensor_model_parallel_rank()
