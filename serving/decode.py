"""The decode worker: receives a request's KV, rebuilds the cache, streams tokens.

A kvwire Receiver serves ``--kv-listen`` in the background. ``POST /internal/decode``
names a request the router had prefilled elsewhere; the worker rebuilds the transformers
cache from the received layers (copying, then releasing the receiver's memory) and
decodes one token per step on its model thread, interleaving concurrent requests.

If the KV cannot be had (the transfer failed or timed out), the worker recomputes the
prefill itself, so a failed transfer never yields wrong tokens; the stream's first line
says which source the cache came from, and the metrics count recomputations.

With a prefix cache (``prefix_cache_bytes``) the worker keeps the KV and linear states of
prompts at block boundaries. A request naming one of them (``cached_hash``) gets only the
KV after it; a request with ``boundary_tokens`` is followed by the states at that
boundary, which the worker stores in the background. Recomputed prefills use and fill
the same cache.

The job is a ``serving.protocol.DecodeJob``; the answer is NDJSON of its stream events: a
``DecodeStarted`` (kv_source, kv_error, rebuild_s), one ``TokenEvent`` per token (the
prefill's first token included), then ``DecodeFinished`` (or ``DecodeFailed``).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from aiohttp import web

from kvwire import KVWireError, LayoutMismatchError, Receiver

from . import protocol
from .errors import BadRequest
from .http import INVALID_REQUEST, answer, base_app, describe, json_error
from .hybrid_cache import kv_layout, new_cache, rebuild_layer, restore, snapshot, snapshot_bytes, to_torch
from .metrics import Registry, render_peers
from .model import LoadedModel
from .prefix_reuse import prefill_reusing
from .steps import decode_step, pick_token, token_logprobs, warm_up
from .worker_state import boundary_suffix, cache_info, new_prefix_cache, state_body

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DecodeOptions:
    """Where the worker receives KV, and how long it waits for it."""

    kv_listen: str = "127.0.0.1:0"
    kv_advertise: str | None = None
    backend: str = "tcp"
    secret: bytes | None = None
    kv_wait_s: float = 30.0
    max_kv_bytes: int = 4 << 30
    prefix_cache_bytes: int = 0  # 0: no prefix cache
    block_tokens: int = 64


class DecodeWorker:
    """Decodes requests whose cache arrives over kvwire (or is recomputed on failure)."""

    def __init__(self, loaded: LoadedModel, options: DecodeOptions = DecodeOptions()):
        self.loaded = loaded
        self.options = options
        self.layout = kv_layout(loaded.config, loaded.dtype_name)
        warm_up(loaded.model)
        self.receiver = Receiver(
            self.layout, listen=options.kv_listen, backend=options.backend, secret=options.secret,
            max_bytes=options.max_kv_bytes, claim_timeout_s=120.0,  # KV whose router never came back
        )
        self.prefix_cache = new_prefix_cache(options.prefix_cache_bytes, options.block_tokens, self.layout)
        self.kv_address = options.kv_advertise or _reachable(self.receiver.address)
        self._model_thread = ThreadPoolExecutor(1, thread_name_prefix="decode-model")
        self._io = ThreadPoolExecutor(16, thread_name_prefix="decode-io")
        self.registry = Registry()
        self.num_requests = self.registry.counter("decode_requests", "Decode requests by KV source", ("kv_source",))
        self.num_failed = self.registry.counter("decode_failed", "Decode requests answered with an error", ("error",))
        self.num_recomputed = self.registry.counter(
            "kv_recomputed", "Requests whose prefill the decode worker recomputed, by the KV error", ("error",)
        )
        self.num_tokens = self.registry.counter("decode_generated_tokens", "Tokens streamed (first token included)")
        self.kv_bytes = self.registry.counter("decode_kv_bytes_received", "KV tensor bytes rebuilt into caches")

    # -- getting the cache ----------------------------------------------------------------

    def receive(self, request_id: str, timeout_s: float, base=None, num_tokens: int | None = None):
        """(I/O thread) Wait for every layer of ``request_id`` and rebuild its cache.

        ``base``: the prefix-cache hit the prefill worker was told we hold; the received
        per-token tensors continue it.
        """
        deadline = time.monotonic() + timeout_s
        with self.receiver.wait(request_id, timeout=timeout_s) as got:
            start = base.num_tokens if base is not None else 0
            if num_tokens is not None and start + got.num_tokens != num_tokens:
                raise LayoutMismatchError(f"request {request_id!r}: received KV for {got.num_tokens} tokens after "
                                          f"{start} cached ones, but the prompt has {num_tokens}")
            cache = restore(self.loaded.config, base.value) if base is not None else new_cache(self.loaded.config)
            for i in range(got.num_layers):
                rebuild_layer(cache, i, got.wait_layer(i, timeout=max(0.0, deadline - time.monotonic())))
            self.kv_bytes.inc(self.layout.nbytes(got.num_tokens))
            return cache

    def keep_boundary(self, request_id: str, token_ids: list[int], cache, timeout_s: float) -> None:
        """(I/O thread) Store the prefix entry at ``len(token_ids)`` once its linear states arrive.

        Safe while ``cache`` decodes on: attention layers grow by ``torch.cat`` into new
        tensors, so the first tokens read here are those received; the linear states,
        updated in place, are not read from the cache but from the boundary transfer.
        """
        boundary = len(token_ids)
        deadline = time.monotonic() + timeout_s
        try:
            kv_layers = snapshot(cache, boundary, states=[{}] * len(cache.layers))
            with self.receiver.wait(request_id + boundary_suffix, timeout=timeout_s) as got:
                layers = [
                    kv if "keys" in kv else {
                        name: to_torch(t).clone()
                        for name, t in got.wait_layer(i, timeout=max(0.0, deadline - time.monotonic())).items()
                    }
                    for i, kv in enumerate(kv_layers)
                ]
            size = snapshot_bytes(layers)
            if self.prefix_cache.can_put(size):
                self.prefix_cache.put(token_ids, layers, size)
        except KVWireError as exc:
            log.warning("request %s: boundary states not received, prefix not kept: %s", request_id, describe(exc))
        except Exception:  # a bug here must not pass silently in an executor
            log.exception("request %s: keeping the %d-token prefix failed", request_id, boundary)

    def recompute(self, token_ids: list[int], sampling, generator):
        """(model thread) The prefill, done here (reusing our prefix cache); returns (cache,
        first token, the logits it was drawn from)."""
        result = prefill_reusing(self.loaded.model, token_ids, self.prefix_cache)
        return result.cache, pick_token(result.logits, sampling, generator), result.logits

    def prefix_base(self, job: protocol.DecodeJob):
        """The prefix entry this request's KV continues: (hit or None, error text or None)."""
        cached_tokens = job.cached_tokens
        if not cached_tokens:
            return None, None
        hit = self.prefix_cache.get(str(job.cached_hash)) if self.prefix_cache is not None else None
        if hit is None or hit.num_tokens != cached_tokens:
            return None, f"PrefixEvicted: the {cached_tokens}-token prefix the KV continues is no longer cached here"
        return hit, None

    async def cache_for(self, job: protocol.DecodeJob, sampling, generator) -> tuple[object, int, str, str | None, object]:
        """(cache, first token, kv_source, kv_error, the first token's logits if drawn here) for a decode request."""
        loop = asyncio.get_running_loop()
        request_id, first_token, kv_error = job.request_id, job.first_token, job.kv_error
        base, base_error = self.prefix_base(job)
        if first_token is not None and base_error is None:
            timeout_s = job.timeout_s or self.options.kv_wait_s
            try:
                cache = await loop.run_in_executor(self._io, self.receive, request_id, timeout_s, base,
                                                   len(job.prompt_token_ids))
                self._keep_boundary_later(job, cache, timeout_s)
                return cache, first_token, "transfer", None, None
            except KVWireError as exc:
                kv_error = describe(exc)
                if job.fallback != "recompute":
                    raise
                log.warning("request %s: KV not received (%s); recomputing the prefill here", request_id, kv_error)
        elif base_error is not None:
            kv_error = base_error
            log.warning("request %s: %s; recomputing the prefill here", request_id, base_error)
        # Whatever did arrive under this id will never be claimed: free it now.
        self.receiver.release(request_id)
        if job.boundary_tokens:
            self.receiver.release(request_id + boundary_suffix)
        self.num_recomputed.inc(1, (kv_error or "none").split(":")[0])
        cache, first, logits = await loop.run_in_executor(
            self._model_thread, self.recompute, job.prompt_token_ids, sampling, generator
        )
        return cache, first, "recomputed", kv_error, logits

    def _keep_boundary_later(self, job: protocol.DecodeJob, cache, timeout_s: float) -> None:
        boundary, request_id = job.boundary_tokens, job.request_id
        if not boundary:
            return
        if self.prefix_cache is None:
            self.receiver.release(request_id + boundary_suffix)  # not wanted: refuse or free it
            return
        self._io.submit(self.keep_boundary, request_id, job.prompt_token_ids[:boundary], cache, timeout_s)

    # -- HTTP -----------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = base_app("decode", self.registry, self._health, self._peer_metrics)
        app.router.add_post("/internal/decode", self.handle_decode)
        app.router.add_get("/internal/state", self.handle_state)
        return app

    async def handle_state(self, request: web.Request) -> web.Response:
        return answer(state_body(self.prefix_cache, self.receiver.metrics().values()))

    def _health(self) -> protocol.WorkerHealth:
        return protocol.WorkerHealth(
            status="ok", role="decode", model=self.loaded.path, architecture=self.loaded.architecture,
            dtype=self.loaded.dtype_name, kv_address=self.kv_address, layout_fingerprint=self.layout.fingerprint,
            prefix_cache=cache_info(self.prefix_cache), max_model_len=self.loaded.max_model_len)

    def _peer_metrics(self) -> list[str]:
        return render_peers("decode", self.receiver.metrics())

    async def handle_decode(self, request: web.Request) -> web.StreamResponse:
        try:
            job = protocol.decode(await request.read(), protocol.DecodeJob)
            if not job.prompt_token_ids:
                raise BadRequest("`prompt_token_ids` must not be empty")
            max_tokens, sampling, stop, stop_token_ids = job.max_tokens, job.sampling.sampling(), job.stop, job.stop_token_ids
            if stop and self.loaded.tokenizer is None:
                raise BadRequest(f"`stop` strings need a tokenizer, and the model at {self.loaded.path} has none; "
                                 "use `stop_token_ids`")
            rng_state = base64.b64decode(job.rng_state, validate=True) if job.rng_state else None
            num_logprobs = job.logprobs
        except (BadRequest, ValueError) as exc:
            return json_error(400, INVALID_REQUEST, str(exc) if isinstance(exc, BadRequest) else describe(exc))
        fresh = sampling.generator()  # a recomputed prefill draws the first token itself
        started = time.perf_counter()
        try:
            cache, first_token, kv_source, kv_error, first_logits = await self.cache_for(job, sampling, fresh)
            # the prefill worker drew the first token: continue its random stream
            generator = sampling.generator(rng_state) if kv_source == "transfer" and rng_state else fresh
        except KVWireError as exc:
            self.num_failed.inc(1, type(exc).__name__)
            return json_error(502, type(exc).__name__, str(exc))
        except Exception as exc:  # a bug must answer, not hang the router
            log.exception("request %s: getting the cache failed", job.request_id)
            self.num_failed.inc(1, type(exc).__name__)
            return json_error(500, "internal_error", describe(exc))
        self.num_requests.inc(1, kv_source)
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        await _line(response, protocol.DecodeStarted(
            kv_source=kv_source, kv_error=kv_error, rebuild_s=time.perf_counter() - started,
            prompt_text=self.decoded(job.prompt_token_ids) if job.echo else None))
        if num_logprobs is None:
            first_logprobs = None
        elif first_logits is not None:
            first_logprobs = token_logprobs(first_logits, first_token, num_logprobs)
        else:
            first_logprobs = job.first_logprobs
        try:
            await self._stream_tokens(response, cache, first_token, max_tokens, sampling, generator, stop,
                                      frozenset(stop_token_ids), num_logprobs, first_logprobs)
        except (ConnectionError, asyncio.CancelledError):
            raise  # the router went away: nothing to tell it
        except Exception as exc:
            log.exception("request %s: decoding failed", job.request_id)
            self.num_failed.inc(1, type(exc).__name__)
            await _line(response, protocol.DecodeFailed(error=protocol.ErrorInfo(type="internal_error",
                                                                                 message=describe(exc))))
        await response.write_eof()
        return response

    async def _stream_tokens(self, response, cache, token: int, max_tokens: int, sampling, generator,
                             stop: list[str] = (), stop_token_ids: frozenset[int] = frozenset(),
                             num_logprobs: int | None = None, logprobs=None) -> None:
        """One line per token until EOS, a stop token or string, or ``max_tokens``. The text
        stops before a stop string (as vLLM's); text that may be the start of one is held back.
        With ``num_logprobs`` each line carries the token's logprobs (``logprobs``: the
        first token's, from whoever drew it)."""
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        tokens: list[int] = []
        text = ""
        hold = max((len(s) for s in stop), default=1) - 1
        while True:
            tokens.append(token)
            self.num_tokens.inc()
            stopped = token in self.loaded.eos_token_ids or token in stop_token_ids
            full = self.decoded(tokens)
            cut = stop_string_at(full, stop, max(0, len(text) - hold))
            if cut is not None:
                full, stopped = full[:cut], True
            last = stopped or len(tokens) >= max_tokens
            piece, text = settled_text(full, text, 0 if last else hold, last)
            await _line(response, protocol.TokenEvent(
                token=token, text=piece,
                logprobs=self._logprobs_line(token, *logprobs) if num_logprobs is not None else None))
            if last:
                break
            logits = await loop.run_in_executor(self._model_thread, decode_step, self.loaded.model, cache, token)
            token = pick_token(logits, sampling, generator, tokens)
            if num_logprobs is not None:
                logprobs = token_logprobs(logits, token, num_logprobs)
        await _line(response, protocol.DecodeFinished(finish_reason="stop" if stopped else "length",
                                                      num_tokens=len(tokens), decode_s=time.perf_counter() - started))

    def _logprobs_line(self, token: int, logprob: float, top: list) -> protocol.LogprobsLine:
        """One token's logprobs with token strings as vLLM writes them (each id decoded alone)."""
        return protocol.LogprobsLine(token=self._piece(token), logprob=logprob,
                                     top=[(self._piece(int(i)), lp) for i, lp in top])

    def _piece(self, token: int) -> str:
        return self.loaded.tokenizer.decode([token]) if self.loaded.tokenizer is not None else f"<{token}>"

    def decoded(self, tokens: list[int]) -> str:
        if self.loaded.tokenizer is None:
            return ""
        return self.loaded.tokenizer.decode(tokens, skip_special_tokens=True)

    def close(self) -> None:
        self.receiver.close()
        self._model_thread.shutdown(wait=False, cancel_futures=True)
        self._io.shutdown(wait=False, cancel_futures=True)


async def _line(response: web.StreamResponse, event: protocol.StreamEvent) -> None:
    await response.write(protocol.encode(event) + b"\n")


def stop_string_at(text: str, stop: list[str], start: int) -> int | None:
    """Where the first stop string found in ``text[start:]`` begins (None: none)."""
    found = [i for i in (text.find(s, start) for s in stop) if i >= 0]
    return min(found) if found else None


def settled_text(full: str, text: str, hold: int, last: bool) -> tuple[str, str]:
    """(new text, text sent so far) once ``full`` is the decoded output. A byte-level token may
    end inside a UTF-8 character, and the last ``hold`` characters may begin a stop string:
    that text waits for the next token (as vLLM's detokenizer does), so the pieces join to
    exactly the final text."""
    if last:
        return full[len(text):], full
    settled = full[:len(full) - hold]
    if full.endswith("\ufffd") or len(settled) <= len(text) or not settled.startswith(text):
        return "", text
    return settled[len(text):], settled


def _reachable(address: str) -> str:
    """The receiver's address as another host would dial it (not 0.0.0.0)."""
    host, _, port = address.rpartition(":")
    if host in ("0.0.0.0", "", "::", "[::]"):
        host = socket.getfqdn()
    return f"{host}:{port}"
