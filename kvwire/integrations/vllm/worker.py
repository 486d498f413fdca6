"""The connector's worker half: kvwire Senders on a prefill instance, a Receiver on a
decode instance, and the copies between vLLM's blocks and the wire.

Prefill: a decode address is dialled when a request to push first appears, so the
handshake overlaps the prefill; in the step where the prefill completes each
full-attention layer is gathered and handed to kvwire from ``save_kv_layer``, right
after that layer computed (its bytes travel while later layers compute), and the
linear-attention states from ``wait_for_save`` once the step is done. Sends copy, so the
request's blocks are free again when it finishes; the transfer is finished (verified by
the receiver) in a background thread.

Decode: the Receiver takes pushes whenever they come. A load waits (without blocking the
engine: it is polled in ``get_transfer_results``) for its request to be opened and every
layer verified, then copies the tokens by position into this instance's blocks and the
state into its state slot, and only then reports the request finished. Any failure
(integrity, a dead prefill instance, a deadline, a refused push) fails that request only,
through ``failed_recving``, and vLLM's ``kv_load_failure_policy`` decides what follows.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from dataclasses import dataclass

from ... import KVWireError, LayoutMismatchError, PeerLostError, Receiver, Sender, TransferTimeout
from ...address import format_address, parse_address
from .cache import AttentionLayer, CacheLayout, to_torch
from .config import ConnectorConfig
from .scheduler import LoadPlan, SendPlan, StepPlan
from .stats import KVWireStats

log = logging.getLogger(__name__)


class PushFailed(KVWireError):
    """The prefill side could not push this request (it says why in its response)."""


def rank_address(address: str, rank: int) -> str:
    """Tensor-parallel rank r of an instance listens on its base port + r."""
    host, port = parse_address(address)
    return format_address(host, port + rank)


@dataclass
class _Push:
    plan: SendPlan
    transfer: object
    sent: set


@dataclass
class _Load:
    plan: LoadPlan
    started_monotonic: float
    handle: object = None


class ConnectorWorker:
    def __init__(self, config: ConnectorConfig, vllm_config, kv_cache_config, role: str):
        self.config = config
        self.role = role
        self.kv_cache_config = kv_cache_config
        self.forward_context = vllm_config.compilation_config.static_forward_context
        self.rank = _tp_rank(vllm_config)
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

    # -- set-up ----------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches) -> None:
        caches = {name: self.forward_context[name].kv_cache for name in kv_caches}
        self.cache = CacheLayout.build(self.kv_cache_config, caches)
        self.layer_of = {layer.name: i for i, layer in enumerate(self.cache.layers)}
        log.info("kvwire layout %s: %s", self.cache.layout.fingerprint, self.cache.names())
        if self.role in ("kv_consumer", "kv_both"):
            listen = rank_address(self.config.listen, self.rank)
            try:
                self.receiver = Receiver(
                    self.cache.layout, listen, backend=self.config.backend, secret=self.secret,
                    ssl_context=self.config.server_tls(), max_bytes=self.config.max_receive_mib << 20,
                    max_request_timeout_s=max(self.config.transfer_timeout_s, 1.0),
                    claim_timeout_s=self.config.lease_s,
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

    def _sender(self, address: str) -> concurrent.futures.Future:
        address = rank_address(address, self.rank)
        future = self._senders.get(address)
        if future is None or (future.done() and future.exception() is not None):
            future = self._senders[address] = self._pool.submit(self._connect, address)
        return future

    def _connect(self, address: str) -> Sender:
        try:
            return Sender(
                self.cache.layout, address, backend=self.config.backend, streams=self.config.streams,
                secret=self.secret, ssl_context=self.config.client_tls(), timeout=self.config.connect_timeout_s,
            )
        except LayoutMismatchError as exc:
            raise LayoutMismatchError(f"{exc} (kvwire layers here: {self.cache.names()})") from None

    def start_load_kv(self, plan: StepPlan) -> None:
        for address in plan.connect:
            self._sender(address)
        for send in plan.sends:
            self._open(send)
        for kvwire_id in plan.releases:
            self._drop_load(kvwire_id)
        for load in plan.loads:
            self._loads[load.req_id] = _Load(load, time.monotonic())

    def _open(self, send: SendPlan) -> None:
        try:
            sender = self._sender(send.address).result(timeout=self.config.connect_timeout_s)
            transfer = sender.open(send.kvwire_id, send.num_tokens, codec=self.config.codec,
                                   timeout=self.config.transfer_timeout_s)
        except concurrent.futures.TimeoutError:
            self._send_failed(send, TransferTimeout(f"no connection to {send.address} within "
                                                    f"{self.config.connect_timeout_s}s"))
            return
        except (KVWireError, ValueError, OSError) as exc:
            if isinstance(exc, PeerLostError):  # the decode instance went away since we dialled
                stale = self._senders.pop(rank_address(send.address, self.rank), None)  # dial afresh next time
                if stale is not None and stale.done() and stale.exception() is None:
                    stale.result().close()
            self._send_failed(send, exc)
            return
        self._pushes.append(_Push(send, transfer, set()))

    def _send_failed(self, send: SendPlan, error: BaseException) -> None:
        log.error("kvwire: pushing request %s (%s) to %s failed: %s: %s", send.req_id, send.kvwire_id,
                  send.address, type(error).__name__, error)
        with self._lock:
            self._stats.record_failure("failed_sends", error)

    def save_kv_layer(self, layer_name: str) -> None:
        index = self.layer_of.get(layer_name)
        if index is None or not self._pushes:
            return
        self._send_layer(index)

    def _send_layer(self, index: int) -> None:
        layer = self.cache.layers[index]
        for push in list(self._pushes):
            if index in push.sent:
                continue
            push.sent.add(index)
            try:
                if isinstance(layer, AttentionLayer):
                    tensors = layer.gather(push.plan.block_ids[self.cache.groups[index]], push.transfer.num_tokens)
                else:
                    tensors = layer.gather(self.cache.state_slot(push.plan.block_ids, self.cache.groups[index]))
                push.transfer.send_layer(index, tensors)
            except (KVWireError, ValueError) as exc:
                self._pushes.remove(push)
                push.transfer.abort(f"{type(exc).__name__}: {exc}")
                self._send_failed(push.plan, exc)

    def wait_for_save(self) -> None:
        """The step is done: send what ``save_kv_layer`` did not (states), then let the
        transfers finish in the background."""
        for index in range(len(self.cache.layers) if self.cache else 0):
            if self._pushes:
                self._send_layer(index)
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
            ended = [push for push in pushes if push.transfer.done or push.transfer.error is not None
                     or time.monotonic() > push.transfer.deadline]
            for push in ended:
                self._finish(push)
            with self._in_flight_cv:
                self._in_flight = [push for push in self._in_flight if push not in ended]
            time.sleep(0.005)

    def _finish(self, push: _Push) -> None:
        try:
            stats = push.transfer.finish(timeout=0)  # ended: returns the stats or raises the error at once
        except KVWireError as exc:
            self._send_failed(push.plan, exc)
            return
        with self._lock:
            self._stats.data["sent_requests"] += 1
            self._stats.record_transfer(stats.wire_bytes, stats.seconds)

    # -- decode side -----------------------------------------------------------------------

    def _drop_load(self, kvwire_id: str) -> None:
        for req_id, load in list(self._loads.items()):
            if load.plan.kvwire_id == kvwire_id:
                del self._loads[req_id]
        if self.receiver is not None:
            self.receiver.release(kvwire_id)

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

    def _try_land(self, load: _Load) -> bool:
        plan = load.plan
        if plan.error:
            raise PushFailed(f"the prefill instance reported: {plan.error}")
        waited = time.monotonic() - load.started_monotonic
        if load.handle is None:
            try:
                load.handle = self.receiver.wait(plan.kvwire_id, timeout=0)
            except TransferTimeout:
                if waited > self.config.load_timeout_s:
                    refusals = self.receiver.refusals(since=load.started_monotonic - self.config.transfer_timeout_s)
                    refused = "".join(f"; meanwhile this receiver refused {peer}: {type(error).__name__}: {error}"
                                      for peer, error in refusals[-2:])
                    if any(isinstance(error, LayoutMismatchError) for _, error in refusals):
                        refused += f" (kvwire layers here: {self.cache.names()})"
                    where = ""
                    if plan.address and parse_address(plan.address)[1] != parse_address(self.receiver.address)[1]:
                        where = (f"; the prefill request named {plan.address} as its decode address, this "
                                 f"instance listens at {self.receiver.address}")
                    raise TransferTimeout(f"no prefill instance pushed request {plan.kvwire_id!r} within "
                                          f"{self.config.load_timeout_s}s (load_timeout_s){refused}{where}") from None
                return False
            if load.handle.num_tokens != plan.num_tokens:
                raise ValueError(f"the push of {plan.kvwire_id!r} holds {load.handle.num_tokens} tokens, this request "
                                 f"needs {plan.num_tokens}")
        handle = load.handle
        if not handle.done:
            if handle.error is not None:
                raise handle.error
            if waited > self.config.load_timeout_s + self.config.transfer_timeout_s:
                raise TransferTimeout(f"request {plan.kvwire_id!r} did not complete in time")
            return False
        with handle:  # released once landed (or failed)
            layers = handle.wait_all(timeout=0)
            self.land(plan, layers)
        nbytes, seconds = self.cache.layout.nbytes(handle.num_tokens), time.monotonic() - load.started_monotonic
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
            self.receiver.release(plan.kvwire_id)
        with self._lock:
            self._stats.record_failure("failed_loads", error)
        self._outcomes[plan.req_id] = (False, text, 0, time.monotonic() - load.started_monotonic)

    # -- reporting -------------------------------------------------------------------------

    def take_outcomes(self) -> dict[str, tuple[bool, str | None, int, float]]:
        outcomes, self._outcomes = self._outcomes, {}
        return outcomes

    def take_stats(self) -> KVWireStats | None:
        with self._lock:
            links = {}
            peers = dict(self.receiver.metrics()) if self.receiver is not None else {}
            for future in self._senders.values():
                if future.done() and future.exception() is None:
                    metrics = future.result().metrics()
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
