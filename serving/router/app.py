"""The router's app: its routes, and one request's way through it (check, route, prefill,
decode, answer), with the metrics and /health that watch it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time

import aiohttp
import msgspec
from aiohttp import web

from kvwire.errors import MISCONFIGURATIONS, KVWireError

from .. import protocol, vllm_upstream
from ..errors import BadRequest, NoWorkerError, PairRefused, Unreachable, UpstreamError
from ..fleet import Decision, Fleet
from ..http import (
    INVALID_REQUEST,
    UNAVAILABLE,
    base_app,
    json_error,
    upstream_response,
)
from ..identify import VLLM_ENGINES
from ..metrics import Registry
from ..prompts import check_parameters
from ..router_config import RouterConfig
from . import openai_api as api
from .streaming import collect, relay_sse
from .workers import call_worker, next_event, open_decode

log = logging.getLogger("serving.router")  # one logger for the router's modules

NOT_FOUND = "NotFoundError"
MISCONFIGURATION = frozenset(cls.__name__ for cls in MISCONFIGURATIONS)
# what a failed KV transfer is answered with (a kvwire error class): only these may be recomputed
KV_TRANSFER_ERRORS = frozenset(cls.__name__ for cls in (KVWireError, *KVWireError.__subclasses__()))


class Router:
    """Routes completions over prefill/decode worker pairs."""

    def __init__(self, config: RouterConfig):
        self.options = config
        self.fleet = Fleet(config)
        self._session: aiohttp.ClientSession | None = None
        self._control: asyncio.Task | None = None
        self._started = int(time.time())
        self.registry = Registry()
        self.num_requests = self.registry.counter("router_requests", "Completions by HTTP status", ("status",))
        self.num_routed = self.registry.counter("router_routed", "Requests by prefill route (local or PrfaaS cluster)",
                                                ("route",))
        self.num_fallbacks = self.registry.counter(
            "router_kv_fallbacks", "Requests whose KV transfer failed, by kvwire error class", ("error",)
        )
        self.num_tokens = self.registry.counter("router_completion_tokens", "Completion tokens returned")
        self.ttft_seconds = self.registry.counter("router_ttft_seconds", "Sum of time to first token")
        self.prefill_seconds = self.registry.counter("router_prefill_seconds", "Sum of prefill legs (sent to answered)")
        self.decode_first_seconds = self.registry.counter(
            "router_decode_first_token_seconds", "Sum of vLLM decode legs, streamed, from sent to their first token "
            "(the KV transfer the prefill leg did not hide, plus one decode step)")
        self.kv_bytes = self.registry.counter("router_kv_bytes", "KV bytes moved for routed requests")
        self.reused_tokens = self.registry.counter("router_reused_prefix_tokens", "Prompt tokens not prefilled again")
        self.threshold = self.registry.gauge("router_threshold_tokens", "Current offload threshold t", ("cluster",))

    # -- lifecycle ------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = base_app("router", self.registry, self._health, self._refresh_gauges)
        app.router.add_post("/v1/completions", self.handle_completions)
        app.router.add_post("/v1/chat/completions", self.handle_chat)
        app.router.add_get("/v1/models", self.handle_models)
        app.on_startup.append(self._startup)
        app.on_cleanup.append(self._cleanup)
        return app

    async def _startup(self, app) -> None:
        # No pool cap: a queued request must not time out waiting for a pooled connection
        # (aiohttp's "connect" timeout counts that wait); workers bound their own work.
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.options.connect_timeout_s),
        )
        await self.fleet.poll(self._session)  # what each worker is, and whether each pair can move KV
        await self.fleet.settle()
        problem = self.fleet.unavailable()
        if problem:
            log.warning("router starts degraded: %s (/health answers 503 until they do)", problem)
        self._control = asyncio.create_task(self.fleet.run(self._session))

    async def _cleanup(self, app) -> None:
        if self._control is not None:
            self._control.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._control
        if self._session is not None:
            await self._session.close()

    def _refresh_gauges(self) -> list[str]:
        for name, cluster in self.fleet.clusters.items():
            self.threshold.set(cluster.controller.threshold_tokens, name)
        return []

    def _health(self) -> dict:
        problem = self.fleet.unavailable()
        return {"status": "degraded" if problem else "ok", "reason": problem,
                "models": self.served_models(),
                "prefill": list(self.options.prefill), "decode": list(self.options.decode),
                "prfaas": {c.name: list(c.prefill) for c in self.options.prfaas},
                "kv_addresses": {url: self.fleet.kv_address_for("", url) for url in self.options.decode},
                **self.fleet.health()}

    # -- what vllm_upstream and streaming use ------------------------------------------------

    @property
    def session(self) -> aiohttp.ClientSession:
        return self._session

    # -- workers --------------------------------------------------------------------------

    async def token_ids(self, prompt) -> list[int]:
        """The prompt as token ids: text is tokenized by a prefill worker (the router has no model).

        Workers are asked in order until one answers; a 400 (bad prompt) is final.
        """
        if isinstance(prompt, list):
            return prompt
        payload = prompt if isinstance(prompt, dict) else {"prompt": prompt}  # {"messages": [...]} for a chat
        unreachable = None
        timeout = aiohttp.ClientTimeout(total=self.options.prefill_timeout_s,
                                        sock_connect=self.options.connect_timeout_s)
        for url in self.options.prefill_urls:
            try:
                if self.fleet.workers[url].engine in VLLM_ENGINES:  # vLLM's own /tokenize
                    return await vllm_upstream.tokenize(self, url, payload, timeout)
                answer = await call_worker(self._session, url, "/internal/tokenize",
                                           protocol.TokenizeRequest(**payload), protocol.TokenizeResult, timeout,
                                           "prefill worker")
                return answer.prompt_token_ids
            except Unreachable as exc:
                unreachable = exc
        raise unreachable

    def served_models(self) -> list[str]:
        """What the decode workers serve, as they last said."""
        return sorted({w.identity.model for url in self.options.decode if (w := self.fleet.workers[url]).identity})

    def check_length(self, job: dict, token_ids: list[int]) -> None:
        """A request longer than any worker can hold is a 400 at once, naming both numbers."""
        limit = self.fleet.max_model_len()
        if limit is None:
            return
        asked = job["max_tokens"] if "max_tokens" in job["body"] or "max_completion_tokens" in job["body"] else 0
        if len(token_ids) + asked > limit:
            more = f" and asks for {asked} more tokens" if asked else ""
            raise UpstreamError(400, INVALID_REQUEST, f"the prompt has {len(token_ids)} tokens{more}: more than this "
                                f"model's maximum length of {limit} tokens")

    def check_model(self, job: dict) -> None:
        """A request naming a model nobody here serves is a 404, as vLLM answers it."""
        wanted = job["model"]
        if wanted is None:
            return
        served = self.served_models()
        if served and wanted not in served:
            raise UpstreamError(404, NOT_FOUND, f"The model `{wanted}` does not exist (served: {', '.join(served)})")

    async def prefill(self, url: str, job: protocol.PrefillJob) -> protocol.PrefillResult:
        """The prefill worker's answer; UpstreamError carrying its error type otherwise."""
        timeout = aiohttp.ClientTimeout(total=self.options.prefill_timeout_s, sock_connect=self.options.connect_timeout_s)
        return await call_worker(self._session, url, "/internal/prefill", job, protocol.PrefillResult, timeout,
                                 "prefill worker")

    # -- the endpoint ---------------------------------------------------------------------

    async def handle_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, chat=False)

    async def handle_chat(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, chat=True)

    async def handle_models(self, request: web.Request) -> web.Response:
        models = self.served_models()
        return web.json_response({"object": "list", "data": [
            {"id": name, "object": "model", "created": self._started, "owned_by": "kvwire", "root": name}
            for name in models]})

    async def _handle(self, request: web.Request, *, chat: bool) -> web.StreamResponse:
        try:
            body = await request.json()
            if not isinstance(body, dict):
                raise BadRequest("the request body must be a JSON object")
            job = api.parse_request(body, chat=chat)
        except (BadRequest, json.JSONDecodeError) as exc:
            self.num_requests.inc(1, "400")
            return json_error(400, INVALID_REQUEST, str(exc) if isinstance(exc, BadRequest) else f"invalid JSON: {exc}")
        try:
            self.check_model(job)
            token_ids = await self.token_ids(job["prompt"])
            self.check_length(job, token_ids)
            decision = self.fleet.decide(token_ids)
            self._check_decode_alive(decision.decode.worker)
        except UpstreamError as exc:
            self.num_requests.inc(1, str(exc.status))
            return upstream_response(exc)
        except PairRefused as exc:
            self.num_requests.inc(1, "503")
            return json_error(503, exc.error_type, f"{exc}; no prefill was started")
        except NoWorkerError as exc:
            self.num_requests.inc(1, "503")
            return json_error(503, UNAVAILABLE, str(exc))
        job["prompt_token_ids"] = token_ids
        identity = self.fleet.workers[decision.decode.worker].identity
        job["model"] = job["model"] or (identity.model if identity else "")
        decode_url = decision.decode.worker
        self.num_routed.inc(1, decision.route.cluster or "local")
        self.fleet.acquire(decode_url)  # the prefill worker only while it prefills (_prefill_step)
        try:
            return await self._complete(request, job, decision)
        finally:
            self.fleet.release(decode_url)

    def _check_decode_alive(self, decode_url: str) -> None:
        """Refuse at once when the control loop finds the decode worker down: a prefill for
        it would be spent for nothing."""
        worker = self.fleet.workers[decode_url]
        if not worker.reachable:
            raise UpstreamError(503, UNAVAILABLE, f"decode worker {decode_url} is unreachable ({worker.error}); "
                                                  "no prefill was started")

    async def _complete(self, request, job: dict, decision: Decision) -> web.StreamResponse:
        started = time.perf_counter()
        prefill_url, decode_url = decision.route.placement.worker, decision.decode.worker
        info = {"request_id": job["id"], "prefill_worker": prefill_url, "decode_worker": decode_url,
                "route": api.route_info(decision, self.fleet)}
        if self.fleet.workers[decode_url].engine in VLLM_ENGINES:
            try:
                return await vllm_upstream.complete(self, request, job, decision, info)
            except UpstreamError as exc:
                self.num_requests.inc(1, str(exc.status))
                return upstream_response(exc)
        try:
            check_parameters(job["body"])
        except BadRequest as exc:
            self.num_requests.inc(1, "400")
            return json_error(400, INVALID_REQUEST, str(exc))
        try:
            decode_job = await self._prefill_step(job, decision, info)
            upstream = await open_decode(self._session, decode_url, decode_job, info, self.options.connect_timeout_s,
                                         self.options.token_timeout_s)
        except UpstreamError as exc:
            self.num_requests.inc(1, str(exc.status))
            return upstream_response(exc)
        try:
            try:
                header = await next_event(upstream, self.options.token_timeout_s, protocol.DecodeStarted)
            except UpstreamError as exc:
                self.num_requests.inc(1, str(exc.status))
                return upstream_response(exc)
            info.update(kv_source=header.kv_source, kv_error=header.kv_error, rebuild_s=header.rebuild_s)
            if job["echo"]:  # the prompt as given, or its tokens as the decode worker's tokenizer reads them
                job["echo_text"] = job["prompt"] if isinstance(job["prompt"], str) else header.prompt_text or ""
            if header.kv_source == "recomputed":
                log.warning("request %s: the decode worker recomputed the prefill (%s)", job["id"], header.kv_error)
            if job["stream"]:
                return await relay_sse(self, request, job, upstream, info, started)
            return await collect(self, job, upstream, info, started)
        finally:
            upstream.release()

    async def _prefill_step(self, job: dict, decision: Decision, info: dict) -> protocol.DecodeJob:
        """Prefill and ship the KV; the decode worker's job (with first_token None on failure)."""
        prefill_url, decode_url = decision.route.placement.worker, decision.decode.worker
        cached = decision.decode.cached_tokens
        decode_job = protocol.DecodeJob(
            request_id=job["id"], prompt_token_ids=job["prompt_token_ids"], max_tokens=job["max_tokens"],
            sampling=job["sampling"], stop=job["stop"], stop_token_ids=job["stop_token_ids"], logprobs=job["logprobs"],
            echo=job["echo"], fallback=self.options.kv_fallback,
        )
        self.fleet.acquire(prefill_url)
        try:
            result = await self.prefill(prefill_url, protocol.PrefillJob(
                request_id=job["id"], prompt=job["prompt_token_ids"], kv_address=decision.kv_address,
                sampling=job["sampling"], logprobs=job["logprobs"], timeout_s=self.options.prefill_timeout_s,
                decode_cached_tokens=cached, send_boundary=decision.send_boundary,
            ))
        except UpstreamError as exc:
            if exc.error_type not in KV_TRANSFER_ERRORS:  # a bad prompt, no prefill worker, a failed forward
                raise
            kv_error = f"{exc.error_type}: {exc}"
            self.num_fallbacks.inc(1, exc.error_type)
            if exc.error_type in MISCONFIGURATION:
                log.error("request %s: KV transfer refused, a misconfiguration: %s", job["id"], kv_error)
                self.fleet.refuse_pair(prefill_url, decode_url, exc.error_type, f"prefill worker {prefill_url} cannot "
                                       f"send KV to decode worker {decode_url}: {exc}")
                raise UpstreamError(exc.status, exc.error_type, f"{exc} (a misconfiguration between prefill worker "
                                    f"{prefill_url} and decode worker {decode_url}: not recomputed)") from None
            if self.options.kv_fallback == "error":
                raise
            log.warning("request %s: KV transfer failed (%s); asking the decode worker to recompute", job["id"],
                        kv_error)
            decode_job.kv_error = kv_error
            info["kv_error_type"] = exc.error_type
            return decode_job
        finally:
            self.fleet.release(prefill_url)
        prefix = result.prefix
        decode_job.first_token, decode_job.rng_state = result.first_token, result.rng_state
        decode_job.first_logprobs, decode_job.cached_tokens, decode_job.cached_hash = (
            result.first_logprobs, cached, decision.decode_hash)
        decode_job.boundary_tokens = prefix.boundary_tokens if prefix.boundary_sent else 0
        self.reused_tokens.inc(prefix.reused_tokens)
        info.update(prefill_s=result.prefill_s, prompt_tokens=len(result.prompt_token_ids),
                    kv=msgspec.structs.asdict(result.kv), prefix=msgspec.structs.asdict(prefix))
        return decode_job

    def account(self, info: dict, num_tokens: int, status: str) -> None:
        """Count one answered request: its status, tokens, and the legs' times and bytes."""
        self.num_requests.inc(1, status)
        self.num_tokens.inc(num_tokens)
        self.ttft_seconds.inc(info.get("ttft_s", 0.0))
        self.prefill_seconds.inc(info.get("prefill_s") or 0.0)
        self.decode_first_seconds.inc(info.get("decode_first_s", 0.0))
        self.kv_bytes.inc(info.get("kv", {}).get("raw_bytes", 0))
