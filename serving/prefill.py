"""The prefill worker: runs prompts and streams each layer's cache to a decode worker.

One kvwire Sender per decode worker, kept for the life of the process and shared by all
requests to it. Forward passes run one at a time on a dedicated thread; waiting for the
receiver's acks happens on another, so the next prompt can prefill meanwhile.

``POST /internal/prefill`` takes ``{request_id, prompt, kv_address, temperature, seed,
timeout_s}`` and answers ``{prompt_token_ids, first_token, prefill_s, kv: {...}}``, 400 on
a bad prompt, or 502 with the kvwire error class as ``error.type``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from aiohttp import web

from kvwire import KVWireError, PeerLostError, Sender

from .http import INVALID_REQUEST, BadRequest, base_app, describe, json_error
from .hybrid_cache import kv_layout
from .metrics import Registry, render_peers
from .model import LoadedModel
from .prompts import parse_sampling, prompt_token_ids
from .steps import pick_token, prefill, warm_up

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrefillOptions:
    """How the prefill worker talks to decode workers."""

    backend: str = "tcp"
    secret: bytes | None = None
    streams: int = 4
    connect_timeout_s: float = 5.0
    kv_timeout_s: float = 60.0


class PrefillWorker:
    """Prefills prompts of one model and sends their KV to the decode worker named per request."""

    def __init__(self, loaded: LoadedModel, options: PrefillOptions = PrefillOptions()):
        self.loaded = loaded
        self.options = options
        self.layout = kv_layout(loaded.config, loaded.dtype_name)
        warm_up(loaded.model)
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

    def compute(self, request_id: str, token_ids: list[int], address: str, sampling, timeout_s: float):
        """(model thread) Prefill with per-layer sends; returns (transfer, first token, seconds, cache)."""
        xfer = self.open(address, request_id, len(token_ids), timeout_s)
        started = time.perf_counter()
        try:
            logits, cache = prefill(self.loaded.model, token_ids, on_layer=xfer.send_layer)
        except BaseException as exc:
            xfer.abort(f"prefill failed: {describe(exc)}")
            raise
        first_token = pick_token(logits, sampling, sampling.generator())
        return xfer, first_token, time.perf_counter() - started, cache

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
        return app

    def _health(self) -> dict:
        return {"model": self.loaded.path, "architecture": self.loaded.architecture, "dtype": self.loaded.dtype_name,
                "layout_fingerprint": self.layout.fingerprint}

    def _peer_metrics(self) -> list[str]:
        with self._senders_lock:
            senders = dict(self._senders)
        return render_peers("prefill", {address: sender.metrics() for address, sender in senders.items()})

    async def handle_prefill(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
            request_id = str(body["request_id"])
            address = str(body["kv_address"])
            token_ids = prompt_token_ids(body.get("prompt"), self.loaded)
            sampling = parse_sampling(body)
            timeout_s = float(body.get("timeout_s", self.options.kv_timeout_s))
        except (BadRequest, KeyError, TypeError, ValueError) as exc:
            self.num_requests.inc(1, "bad_request")
            return json_error(400, INVALID_REQUEST, str(exc) if isinstance(exc, BadRequest) else describe(exc))
        loop = asyncio.get_running_loop()
        try:
            xfer, first_token, prefill_s, cache = await loop.run_in_executor(
                self._model_thread, self.compute, request_id, token_ids, address, sampling, timeout_s
            )
            tail_started = time.perf_counter()
            stats = await loop.run_in_executor(self._io, xfer.finish, timeout_s)
            tail_s = time.perf_counter() - tail_started
            del cache  # the arrays send_layer borrowed may go now
        except KVWireError as exc:
            self.num_requests.inc(1, "kv_failed")
            self.kv_failures.inc(1, type(exc).__name__)
            log.warning("request %s: KV transfer to %s failed: %s", request_id, address, describe(exc))
            return json_error(502, type(exc).__name__, str(exc), prompt_token_ids=token_ids)
        except Exception as exc:  # a bug must answer, not hang the router
            log.exception("request %s: prefill failed", request_id)
            self.num_requests.inc(1, "error")
            return json_error(500, "internal_error", describe(exc))
        self.num_requests.inc(1, "ok")
        self.num_prompt_tokens.inc(len(token_ids))
        self.prefill_seconds.inc(prefill_s)
        self.kv_bytes.inc(stats.raw_bytes)
        link = self.sender(address).metrics()
        return web.json_response({
            "request_id": request_id,
            "prompt_token_ids": token_ids,
            "first_token": first_token,
            "prefill_s": prefill_s,
            "kv": {
                "raw_bytes": stats.raw_bytes, "wire_bytes": stats.wire_bytes, "layers": stats.layers,
                "transfer_s": stats.seconds, "after_prefill_s": tail_s,
                "goodput_bps": stats.raw_bytes * 8 / max(stats.seconds, 1e-9),
                "link_goodput_bps": link.goodput_bps, "rtt_ms": link.rtt_ms, "retransmits": link.retransmits,
            },
        })
