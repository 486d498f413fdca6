"""The prefill worker: runs prompts and streams each layer's cache to a decode worker.

One kvwire Sender per decode worker, kept for the life of the process and shared by all
requests to it. Forward passes run one at a time on a dedicated thread; waiting for the
receiver's acks happens on another, so the next prompt can prefill meanwhile.

``POST /internal/prefill`` takes a ``serving.protocol.PrefillJob`` and answers a
``PrefillResult`` (first token, prefill time, KV and prefix reports), 400 on a bad prompt,
or 502 with the kvwire error class as ``error.type``.

With a prefix cache (``prefix_cache_bytes``) a prompt whose prefix was seen before is
prefilled from the cached boundary on. ``decode_cached_tokens`` says how much of the
prompt the decode worker already holds: only the KV after it is sent. With
``send_boundary`` the linear states at the prompt's last block boundary follow as request
``<request_id>/boundary`` (0 tokens), so the decode worker can keep that prefix too.
``GET /internal/state`` reports the boundaries held and the per-peer link metrics.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from aiohttp import web

from kvwire import KVWireError, PeerLostError, Sender, probe
from kvwire.address import check_address

from . import protocol
from .errors import BadRequest
from .http import INVALID_REQUEST, answer, base_app, describe, json_error
from .hybrid_cache import kv_layout
from .metrics import Registry, render_peers
from .model import LoadedModel
from .prefix_reuse import prefill_reusing
from .prompts import chat_token_ids, prompt_token_ids
from .steps import generator_state, pick_token, token_logprobs, warm_up
from .worker_state import boundary_suffix, cache_info, new_prefix_cache, state_body

log = logging.getLogger(__name__)

PREFILL_FAILED = "prefill_failed"  # the forward itself failed: recomputing it elsewhere would fail the same way


@dataclass(frozen=True)
class PrefillOptions:
    """How the prefill worker talks to decode workers."""

    backend: str = "tcp"
    secret: bytes | None = None
    streams: int = 4
    connect_timeout_s: float = 5.0
    kv_timeout_s: float = 60.0
    prefix_cache_bytes: int = 0  # 0: no prefix cache
    block_tokens: int = 64


class PrefillWorker:
    """Prefills prompts of one model and sends their KV to the decode worker named per request."""

    def __init__(self, loaded: LoadedModel, options: PrefillOptions = PrefillOptions()):
        self.loaded = loaded
        self.options = options
        self.layout = kv_layout(loaded.config, loaded.dtype_name)
        warm_up(loaded.model)
        self.prefix_cache = new_prefix_cache(options.prefix_cache_bytes, options.block_tokens, self.layout)
        self._senders: dict[str, Sender] = {}
        self._senders_lock = threading.Lock()
        self._model_thread = ThreadPoolExecutor(1, thread_name_prefix="prefill-model")
        self._io = ThreadPoolExecutor(16, thread_name_prefix="prefill-io")
        self.registry = Registry()
        self.num_requests = self.registry.counter("prefill_requests", "Prefill requests by outcome", ("outcome",))
        self.num_prompt_tokens = self.registry.counter("prefill_prompt_tokens", "Prompt tokens prefilled")
        self.prefill_seconds = self.registry.counter("prefill_seconds", "Seconds spent in prefill forward passes")
        self.kv_bytes = self.registry.counter("prefill_kv_bytes_sent", "KV tensor bytes confirmed by decode workers")
        self.kv_failures = self.registry.counter("prefill_kv_failures", "KV transfers that failed", ("error",))
        self.reused_tokens = self.registry.counter("prefill_reused_tokens", "Prompt tokens taken from the prefix cache")

    # -- senders --------------------------------------------------------------------------

    def sender(self, address: str) -> Sender:
        """The long-lived Sender to ``address``, reconnecting if all its connections died."""
        with self._senders_lock:
            sender = self._senders.get(address)
            if sender is not None and sender.num_streams == 0:
                sender.close()
                sender = None
            if sender is None:
                sender = Sender(
                    self.layout, address, backend=self.options.backend, streams=self.options.streams,
                    secret=self.options.secret, timeout=self.options.connect_timeout_s,
                )
                self._senders[address] = sender
                log.info("connected to decode worker KV at %s (%d streams)", address, sender.num_streams)
            return sender

    def drop_sender(self, address: str) -> None:
        with self._senders_lock:
            sender = self._senders.pop(address, None)
        if sender is not None:
            sender.close()

    def open(self, address: str, request_id: str, num_tokens: int, timeout_s: float):
        """Open a transfer, retrying once on a fresh Sender if the cached one has gone stale."""
        try:
            return self.sender(address).open(request_id, num_tokens, timeout=timeout_s)
        except PeerLostError:
            self.drop_sender(address)
            return self.sender(address).open(request_id, num_tokens, timeout=timeout_s)

    # -- one request ----------------------------------------------------------------------

    def compute(self, request_id: str, token_ids: list[int], address: str, sampling, timeout_s: float,
                send_from: int = 0, send_boundary: bool = False):
        """(model thread) Prefill with per-layer sends of the tokens from ``send_from`` on.

        Returns (transfers, (first token, random state after it), seconds, result): the KV
        transfer, then the boundary transfer if one was sent; finish them all before
        dropping ``result``. The random state (None when greedy) lets the decode worker
        continue the request's sampling stream where this draw left it.
        """
        xfer = self.open(address, request_id, len(token_ids) - send_from, timeout_s)
        transfers = [xfer]
        started = time.perf_counter()
        try:
            result = prefill_reusing(self.loaded.model, token_ids, self.prefix_cache, xfer.send_layer, send_from)
            if send_boundary and result.boundary_tokens > send_from:
                boundary = self.open(address, request_id + boundary_suffix, 0, timeout_s)
                transfers.append(boundary)
                for i, (layer, states) in enumerate(zip(result.boundary, result.boundary_states)):
                    boundary.send_layer(i, states or {name: t[:0] for name, t in layer.items()})
        except BaseException as exc:
            for transfer in transfers:
                transfer.abort(f"prefill failed: {describe(exc)}")
            raise
        generator = sampling.generator()
        first_token = pick_token(result.logits, sampling, generator)
        return transfers, (first_token, generator_state(generator)), time.perf_counter() - started, result

    def close(self) -> None:
        with self._senders_lock:
            senders, self._senders = list(self._senders.values()), {}
        for sender in senders:
            sender.close()
        self._model_thread.shutdown(wait=False, cancel_futures=True)
        self._io.shutdown(wait=False, cancel_futures=True)

    # -- HTTP -----------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = base_app("prefill", self.registry, self._health, self._peer_metrics)
        app.router.add_post("/internal/prefill", self.handle_prefill)
        app.router.add_post("/internal/tokenize", self.handle_tokenize)
        app.router.add_post("/internal/probe", self.handle_probe)
        app.router.add_get("/internal/state", self.handle_state)
        return app

    def _health(self) -> protocol.WorkerHealth:
        return protocol.WorkerHealth(
            status="ok", role="prefill", model=self.loaded.path, architecture=self.loaded.architecture,
            dtype=self.loaded.dtype_name, layout_fingerprint=self.layout.fingerprint,
            prefix_cache=cache_info(self.prefix_cache), max_model_len=self.loaded.max_model_len)

    def _senders_snapshot(self) -> dict[str, Sender]:
        with self._senders_lock:
            return dict(self._senders)

    @staticmethod
    def _finish_boundary(transfer, timeout_s: float, borrowed) -> None:
        """(I/O thread) The boundary states are an optimisation: a failure is logged, no more.

        ``borrowed`` (the prefill result) keeps the tensors being sent alive until then.
        """
        try:
            transfer.finish(timeout_s)
        except KVWireError as exc:
            log.warning("boundary states of %s not delivered: %s", transfer.request_id, describe(exc))

    async def handle_state(self, request: web.Request) -> web.Response:
        """What the router's control loop reads: boundaries held, link metrics."""
        peers = [sender.metrics() for sender in self._senders_snapshot().values()]
        return answer(state_body(self.prefix_cache, peers))

    async def handle_tokenize(self, request: web.Request) -> web.Response:
        try:
            job = protocol.decode(await request.read(), protocol.TokenizeRequest)
            if job.messages is not None:
                token_ids = chat_token_ids(job.messages, self.loaded)
            else:
                token_ids = prompt_token_ids(job.prompt, self.loaded)
        except (BadRequest, AttributeError, ValueError) as exc:
            return json_error(400, INVALID_REQUEST, str(exc) if isinstance(exc, BadRequest) else describe(exc))
        return answer(protocol.TokenizeResult(prompt_token_ids=token_ids))

    async def handle_probe(self, request: web.Request) -> web.Response:
        """Can this worker send KV to ``kv_address``? The handshake's proof of the secret, no
        KV moved (kvwire.probe): a ProbeResult, ``ok`` or the ``error`` that refused it."""
        try:
            job = protocol.decode(await request.read(), protocol.ProbeRequest)
            address = check_address(job.kv_address, what="`kv_address`")
        except (BadRequest, ValueError) as exc:
            return json_error(400, INVALID_REQUEST, str(exc) if isinstance(exc, BadRequest) else describe(exc))
        timeout_s = job.timeout_s or self.options.connect_timeout_s
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._io, lambda: probe(address, backend=self.options.backend,
                                                               secret=self.options.secret, timeout=timeout_s))
        except KVWireError as exc:
            return answer(protocol.ProbeResult(error=protocol.ErrorInfo(type=type(exc).__name__, message=str(exc))))
        return answer(protocol.ProbeResult(ok=True))

    def _peer_metrics(self) -> list[str]:
        senders = self._senders_snapshot()
        return render_peers("prefill", {address: sender.metrics() for address, sender in senders.items()})

    async def handle_prefill(self, request: web.Request) -> web.Response:
        try:
            job = protocol.decode(await request.read(), protocol.PrefillJob)
            request_id, address = job.request_id, job.kv_address
            token_ids = prompt_token_ids(job.prompt, self.loaded)
            sampling = job.sampling.sampling()
            timeout_s = job.timeout_s or self.options.kv_timeout_s
            send_from, send_boundary, num_logprobs = job.decode_cached_tokens, job.send_boundary, job.logprobs
            if len(token_ids) > self.loaded.max_model_len:
                raise BadRequest(f"the prompt has {len(token_ids)} tokens, more than this model's maximum length of "
                                 f"{self.loaded.max_model_len} (--max-model-len)")
            if not 0 <= send_from < len(token_ids):
                raise BadRequest(f"`decode_cached_tokens` is {send_from}, outside [0, {len(token_ids)}) for this prompt")
        except (BadRequest, ValueError) as exc:
            self.num_requests.inc(1, "bad_request")
            return json_error(400, INVALID_REQUEST, str(exc) if isinstance(exc, BadRequest) else describe(exc))
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + timeout_s  # one deadline for the prefill and the KV transfer
        transfers = []
        try:
            transfers, (first_token, rng_state), prefill_s, result = await loop.run_in_executor(
                self._model_thread, self.compute, request_id, token_ids, address, sampling, timeout_s,
                send_from, send_boundary,
            )
            tail_started = time.perf_counter()
            stats = await loop.run_in_executor(self._io, transfers[0].finish, max(0.0, deadline - time.monotonic()))
            tail_s = time.perf_counter() - tail_started
        except KVWireError as exc:
            _abort_rest(transfers, f"the KV transfer of {request_id!r} failed")
            self.num_requests.inc(1, "kv_failed")
            self.kv_failures.inc(1, type(exc).__name__)
            log.warning("request %s: KV transfer to %s failed: %s", request_id, address, describe(exc))
            return json_error(502, type(exc).__name__, str(exc))
        except Exception as exc:  # the model failed (memory...) or a bug: answer, and never as a KV failure
            _abort_rest(transfers, f"prefill of {request_id!r} failed")
            log.exception("request %s: prefill failed", request_id)
            self.num_requests.inc(1, "error")
            return json_error(500, PREFILL_FAILED, f"the prefill of {len(token_ids)} tokens failed: {describe(exc)}")
        prefix = protocol.PrefixReport(reused_tokens=result.reused_tokens,
                                       computed_tokens=len(token_ids) - result.reused_tokens,
                                       boundary_tokens=result.boundary_tokens, sent_from_token=send_from,
                                       boundary_sent=len(transfers) > 1)
        if len(transfers) > 1:  # the decode worker waits for it in the background: not on the TTFT path
            self._io.submit(self._finish_boundary, transfers[1], max(0.0, deadline - time.monotonic()), result)
        first_logprobs = token_logprobs(result.logits, first_token, num_logprobs) if num_logprobs is not None else None
        del result  # the arrays send_layer borrowed may go now (the boundary's are kept by its task)
        self.num_requests.inc(1, "ok")
        self.num_prompt_tokens.inc(len(token_ids))
        self.prefill_seconds.inc(prefill_s)
        self.kv_bytes.inc(stats.raw_bytes)
        self.reused_tokens.inc(prefix.reused_tokens)
        link = self.sender(address).metrics()
        return answer(protocol.PrefillResult(
            request_id=request_id,
            prompt_token_ids=token_ids,
            first_token=first_token,
            rng_state=base64.b64encode(rng_state).decode() if rng_state is not None else None,
            first_logprobs=first_logprobs,
            prefill_s=prefill_s,
            prefix=prefix,
            kv=protocol.KVReport(
                raw_bytes=stats.raw_bytes, wire_bytes=stats.wire_bytes, layers=stats.layers,
                transfer_s=stats.seconds, after_prefill_s=tail_s,
                goodput_bps=stats.raw_bytes * 8 / max(stats.seconds, 1e-9),
                link_goodput_bps=link.goodput_bps, rtt_ms=link.rtt_ms, retransmits=link.retransmits,
            ),
        ))


def _abort_rest(transfers: list, reason: str) -> None:
    """Abort the transfers after the failed first one (the boundary must not outlive it)."""
    for transfer in transfers[1:]:
        transfer.abort(reason)
