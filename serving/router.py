"""The router: an OpenAI completions endpoint in front of prefill and decode workers.

For each request it asks the Fleet (serving.fleet) where to go: a local PD prefill
worker, or a PrfaaS cluster when the prompt's incremental length exceeds that cluster's
threshold t; the workers reusing the longest cached prefix, then the least busy. The
prefill worker runs the prompt (from its cached prefix) and streams the KV the decode
worker lacks to its kvwire address; the router then relays the decode worker's tokens
to the client (JSON, or SSE with ``stream: true``). The response's ``kvwire`` field says
which route was taken and why.

Every upstream call has a timeout, and every failure becomes an HTTP error whose
``error.type`` names what broke (the kvwire error class for transfer failures). When the
KV transfer fails but the decode worker is alive, it recomputes the prefill (unless
``kv_fallback="error"``): the response's ``kvwire.kv_source`` says which happened. A
transfer refused for a misconfiguration (wrong secret, other layout, a KV address that is
not kvwire) is always an error: recomputing would hide it behind working answers.

``/health`` is 503 ``"degraded"`` while no prefill or no decode worker answers the control
loop, with the reason; a request whose decode worker is down is refused before any
prefill is spent on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid

import aiohttp
from aiohttp import web

from kvwire.errors import MISCONFIGURATIONS, KVWireError

from . import vllm_upstream
from .fleet import Decision, Fleet, PairRefused
from .http import INVALID_REQUEST, BadRequest, base_app, describe, error_body, json_error
from .identify import VLLM_ENGINES
from .metrics import Registry
from .policy import NoWorkerError
from .prompts import (
    check_messages,
    check_parameters,
    check_prompt_shape,
    parse_logprobs,
    parse_max_tokens,
    parse_sampling,
    parse_stop,
)
from .router_config import RouterConfig

log = logging.getLogger(__name__)

UNAVAILABLE = "worker_unavailable"
NOT_FOUND = "NotFoundError"
MISCONFIGURATION = frozenset(cls.__name__ for cls in MISCONFIGURATIONS)
# what a failed KV transfer is answered with (a kvwire error class): only these may be recomputed
KV_TRANSFER_ERRORS = frozenset(cls.__name__ for cls in (KVWireError, *KVWireError.__subclasses__()))


class UpstreamError(Exception):
    """A worker answered with an error, or could not be reached: becomes our HTTP error."""

    def __init__(self, status: int, error_type: str, message: str):
        super().__init__(message)
        self.status = status
        self.error_type = error_type

    def response(self) -> web.Response:
        return json_error(self.status, self.error_type, str(self))


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

    # -- what vllm_upstream uses -----------------------------------------------------------

    @property
    def session(self) -> aiohttp.ClientSession:
        return self._session

    @staticmethod
    def upstream_error(status: int, error_type: str, message: str) -> UpstreamError:
        return UpstreamError(status, error_type, message)

    def account(self, info: dict, num_tokens: int, status: str) -> None:
        self._account(info, num_tokens, status)

    # -- workers --------------------------------------------------------------------------

    async def token_ids(self, prompt) -> list[int]:
        """The prompt as token ids: text is tokenized by a prefill worker (the router has no model).

        Workers are asked in order until one answers; a 400 (bad prompt) is final.
        """
        if isinstance(prompt, list):
            return prompt
        payload = prompt if isinstance(prompt, dict) else {"prompt": prompt}  # {"messages": [...]} for a chat
        unreachable = None
        for url in self.options.prefill_urls:
            vllm = self.fleet.workers[url].engine in VLLM_ENGINES
            try:
                timeout = aiohttp.ClientTimeout(total=self.options.prefill_timeout_s,
                                                sock_connect=self.options.connect_timeout_s)
                async with self._session.post(url + ("/tokenize" if vllm else "/internal/tokenize"),
                                              json=payload, timeout=timeout) as response:
                    body = await response.json()
            except (aiohttp.ClientError, asyncio.TimeoutError, json.JSONDecodeError) as exc:
                unreachable = UpstreamError(502, UNAVAILABLE, f"prefill worker {url} is unreachable: {_client_error(exc)}")
                continue
            if response.status != 200:
                error = body.get("error", {})
                raise UpstreamError(response.status, error.get("type", UNAVAILABLE), error.get("message", str(body)))
            return body["tokens"] if vllm else body["prompt_token_ids"]
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

    async def _get_json(self, url: str, path: str, role: str) -> dict:
        try:
            timeout = aiohttp.ClientTimeout(total=self.options.connect_timeout_s * 2)
            async with self._session.get(url + path, timeout=timeout) as response:
                return await response.json()
        except (aiohttp.ClientError, asyncio.TimeoutError, json.JSONDecodeError) as exc:
            raise UpstreamError(502, UNAVAILABLE, f"{role} {url} is unreachable: {_client_error(exc)}") from None

    async def prefill(self, url: str, payload: dict) -> dict:
        """The prefill worker's answer; UpstreamError carrying its error type otherwise."""
        timeout = aiohttp.ClientTimeout(total=self.options.prefill_timeout_s, sock_connect=self.options.connect_timeout_s)
        try:
            async with self._session.post(url + "/internal/prefill", json=payload, timeout=timeout) as response:
                body = await response.json()
        except (aiohttp.ClientError, asyncio.TimeoutError, json.JSONDecodeError) as exc:
            raise UpstreamError(502, UNAVAILABLE, f"prefill worker {url} is unreachable: {_client_error(exc)}") from None
        if response.status != 200:
            error = body.get("error", {})
            raise UpstreamError(response.status, error.get("type", UNAVAILABLE), error.get("message", str(body)))
        return body

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
            job = _parse(body, chat=chat)
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
            return exc.response()
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
                "route": _route_info(decision, self.fleet)}
        if self.fleet.workers[decode_url].engine in VLLM_ENGINES:
            try:
                return await vllm_upstream.complete(self, request, job, decision, info)
            except UpstreamError as exc:
                self.num_requests.inc(1, str(exc.status))
                return exc.response()
        try:
            check_parameters(job["body"])
        except BadRequest as exc:
            self.num_requests.inc(1, "400")
            return json_error(400, INVALID_REQUEST, str(exc))
        try:
            decode_job = await self._prefill_step(job, decision, info)
            upstream = await self._open_decode(decode_url, decode_job, info)
        except UpstreamError as exc:
            self.num_requests.inc(1, str(exc.status))
            return exc.response()
        try:
            try:
                header = await _next_line(upstream, self.options.token_timeout_s)
            except UpstreamError as exc:
                self.num_requests.inc(1, str(exc.status))
                return exc.response()
            info.update(kv_source=header["kv_source"], kv_error=header["kv_error"], rebuild_s=header["rebuild_s"])
            if job["echo"]:  # the prompt as given, or its tokens as the decode worker's tokenizer reads them
                job["echo_text"] = job["prompt"] if isinstance(job["prompt"], str) else header.get("prompt_text", "")
            if header["kv_source"] == "recomputed":
                log.warning("request %s: the decode worker recomputed the prefill (%s)", job["id"], header["kv_error"])
            if job["stream"]:
                return await self._stream(request, job, upstream, info, started)
            return await self._collect(job, upstream, info, started)
        finally:
            upstream.release()

    async def _prefill_step(self, job: dict, decision: Decision, info: dict) -> dict:
        """Prefill and ship the KV; the decode worker's job (with first_token None on failure)."""
        prefill_url, decode_url = decision.route.placement.worker, decision.decode.worker
        cached = decision.decode.cached_tokens
        decode_job = {
            "request_id": job["id"], "max_tokens": job["max_tokens"], **job["sampling"], "stop": job["stop"],
            "logprobs": job["logprobs"], "first_logprobs": None, "echo": job["echo"],
            "stop_token_ids": job["stop_token_ids"], "fallback": self.options.kv_fallback, "first_token": None,
            "rng_state": None, "kv_error": None, "prompt_token_ids": job["prompt_token_ids"], "cached_tokens": 0,
            "cached_hash": None, "boundary_tokens": 0,
        }
        self.fleet.acquire(prefill_url)
        try:
            kv_address = decision.kv_address
            result = await self.prefill(prefill_url, {
                "request_id": job["id"], "prompt": job["prompt_token_ids"], "kv_address": kv_address,
                **job["sampling"], "logprobs": job["logprobs"], "timeout_s": self.options.prefill_timeout_s,
                "decode_cached_tokens": cached, "send_boundary": decision.send_boundary,
            })
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
            decode_job["kv_error"] = kv_error
            info["kv_error_type"] = exc.error_type
            return decode_job
        finally:
            self.fleet.release(prefill_url)
        prefix = result.get("prefix", {})
        decode_job.update(first_token=result["first_token"], rng_state=result.get("rng_state"),
                          first_logprobs=result.get("first_logprobs"), cached_tokens=cached,
                          cached_hash=decision.decode_hash,
                          boundary_tokens=prefix.get("boundary_tokens", 0) if prefix.get("boundary_sent") else 0)
        self.reused_tokens.inc(prefix.get("reused_tokens", 0))
        info.update(prefill_s=result["prefill_s"], prompt_tokens=len(result["prompt_token_ids"]), kv=result["kv"],
                    prefix=prefix)
        return decode_job

    async def _open_decode(self, decode_url: str, decode_job: dict, info: dict) -> aiohttp.ClientResponse:
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.options.connect_timeout_s,
                                        sock_read=self.options.token_timeout_s)
        try:
            response = await self._session.post(decode_url + "/internal/decode", json=decode_job, timeout=timeout)
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            message = f"decode worker {decode_url} is unreachable: {_client_error(exc)}"
            if decode_job["kv_error"]:
                message += f"; the KV transfer had failed with {decode_job['kv_error']}"
            log.warning("request %s: %s; answered 502, nothing recomputed", decode_job["request_id"], message)
            raise UpstreamError(502, info.get("kv_error_type", UNAVAILABLE), message) from None
        if response.status != 200:
            try:
                error = (await response.json()).get("error", {})
            except (aiohttp.ClientError, json.JSONDecodeError, asyncio.TimeoutError):
                error = {}
            response.release()
            raise UpstreamError(response.status, error.get("type", UNAVAILABLE),
                                error.get("message", f"decode worker {decode_url} answered HTTP {response.status}"))
        info["prompt_tokens"] = len(decode_job["prompt_token_ids"])
        return response

    async def _collect(self, job: dict, upstream, info: dict, started: float) -> web.Response:
        tokens, text, logprobs, final = [], [job.get("echo_text", "")], [], None
        try:
            while final is None:
                line = await _next_line(upstream, self.options.token_timeout_s)
                if "error" in line:
                    raise UpstreamError(502, line["error"]["type"], line["error"]["message"])
                if "token" in line:
                    if not tokens:
                        info["ttft_s"] = time.perf_counter() - started
                    tokens.append(line["token"])
                    text.append(line["text"])
                    logprobs.append(line.get("logprobs"))
                else:
                    final = line
        except UpstreamError as exc:
            self.num_requests.inc(1, str(exc.status))
            return exc.response()
        choice = _choice(job, "".join(text), final["finish_reason"], tokens, delta=False,
                         logprobs=_logprobs(job, logprobs, len(text[0])))
        self._account(info, len(tokens), "200")
        return web.json_response({
            "id": job["id"], "object": "chat.completion" if job["chat"] else "text_completion",
            "created": job["created"], "model": job["model"], "choices": [choice],
            "usage": _usage(info["prompt_tokens"], len(tokens)), "kvwire": _extension(info, final, started),
        })

    async def _stream(self, request, job: dict, upstream, info: dict, started: float) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        num_tokens, offset = 0, len(job.get("echo_text", ""))
        if offset:
            await _event(response, _chunk(job, [_choice(job, job["echo_text"], None, [], delta=True)]))
        try:
            while True:
                line = await _next_line(upstream, self.options.token_timeout_s)
                if "error" in line:
                    raise UpstreamError(502, line["error"]["type"], line["error"]["message"])
                if "token" not in line:
                    break
                if num_tokens == 0:
                    info["ttft_s"] = time.perf_counter() - started
                num_tokens += 1
                logprobs = _logprobs(job, [line.get("logprobs")], offset)
                offset += len(line["logprobs"]["token"]) if logprobs else 0
                await _event(response, _chunk(job, [_choice(job, line["text"], None, [line["token"]], delta=True,
                                                             logprobs=logprobs)]))
        except UpstreamError as exc:
            self._account(info, num_tokens, str(exc.status))
            await _event(response, error_body(exc.error_type, str(exc)))
            await response.write_eof()
            return response
        chunk = _chunk(job, [_choice(job, "", line["finish_reason"], [], delta=True)])
        chunk.update(usage=_usage(info["prompt_tokens"], num_tokens), kvwire=_extension(info, line, started))
        await _event(response, chunk)
        if job["include_usage"]:  # OpenAI's stream_options: a last chunk with no choices, only the usage
            await _event(response, {**_chunk(job, []), "usage": _usage(info["prompt_tokens"], num_tokens)})
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        self._account(info, num_tokens, "200")
        return response

    def _account(self, info: dict, num_tokens: int, status: str) -> None:
        self.num_requests.inc(1, status)
        self.num_tokens.inc(num_tokens)
        self.ttft_seconds.inc(info.get("ttft_s", 0.0))
        self.prefill_seconds.inc(info.get("prefill_s") or 0.0)
        self.decode_first_seconds.inc(info.get("decode_first_s", 0.0))
        self.kv_bytes.inc(info.get("kv", {}).get("raw_bytes", 0))


def _parse(body: dict, *, chat: bool = False) -> dict:
    """The request's fields, checked; BadRequest names the first bad one. A chat's prompt
    is ``{"messages": [...]}``, which a prefill worker turns into tokens with its template."""
    if chat:
        if "messages" not in body:
            raise BadRequest("`messages` is required")
        prompt = {"messages": check_messages(body["messages"])}
    else:
        if "prompt" not in body:
            raise BadRequest("`prompt` is required")
        check_prompt_shape(body["prompt"])
        prompt = body["prompt"]
    for flag in ("stream", "return_token_ids"):
        if not isinstance(body.get(flag, False), bool):
            raise BadRequest(f"`{flag}` must be true or false, got {body[flag]!r}")
    if body.get("n", 1) not in (1, None):
        raise BadRequest(f"`n` must be 1, got {body['n']!r}")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise BadRequest(f"`model` must be a string, got {model!r}")
    if chat and body.get("max_completion_tokens") is not None and body.get("max_tokens") is None:
        body = {**body, "max_tokens": body["max_completion_tokens"]}
    sampling = parse_sampling(body)
    stop, stop_token_ids = parse_stop(body)
    logprobs = parse_logprobs(body, chat=chat)
    if not isinstance(body.get("echo", False), bool):
        raise BadRequest(f"`echo` must be true or false, got {body['echo']!r}")
    if body.get("echo") and (chat or logprobs is not None):
        raise BadRequest("`echo` is supported for /v1/completions without `logprobs` (the prompt's logprobs are "
                         "not computed)" if not chat else "`echo` is not supported for chats")
    return {
        "body": body, "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
        "model": model, "chat": chat, "prompt": prompt, "max_tokens": parse_max_tokens(body),
        "sampling": {"temperature": sampling.temperature, "seed": sampling.seed, "top_p": sampling.top_p,
                     "top_k": sampling.top_k, "presence_penalty": sampling.presence_penalty,
                     "frequency_penalty": sampling.frequency_penalty},
        "logprobs": logprobs, "echo": bool(body.get("echo")),
        "stop": stop, "stop_token_ids": stop_token_ids, "stream": body.get("stream", False),
        "include_usage": bool((body.get("stream_options") or {}).get("include_usage", False)),
        "return_token_ids": body.get("return_token_ids", False),
    }


async def _next_line(upstream: aiohttp.ClientResponse, timeout_s: float) -> dict:
    """The next NDJSON message from a decode worker; UpstreamError if the stream broke."""
    try:
        line = await asyncio.wait_for(upstream.content.readline(), timeout_s)
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        raise UpstreamError(502, UNAVAILABLE, f"decode stream from {upstream.url.origin()} broke: {_client_error(exc)}") from None
    if not line:
        raise UpstreamError(502, UNAVAILABLE, f"decode worker {upstream.url.origin()} closed the stream early")
    return json.loads(line)


def _chunk(job: dict, choices: list) -> dict:
    kind = "chat.completion.chunk" if job["chat"] else "text_completion"
    return {"id": job["id"], "object": kind, "created": job["created"], "model": job["model"], "choices": choices}


def _choice(job: dict, text: str, finish_reason: str | None, token_ids: list[int], *, delta: bool,
            logprobs: dict | None = None) -> dict:
    """One choice in the completions or the chat shape (``delta`` for a streamed chat chunk)."""
    choice: dict = {"index": 0}
    if not job["chat"]:
        choice.update(text=text, logprobs=logprobs)
    elif delta:
        choice["delta"] = {"role": "assistant", "content": text} if text or finish_reason is None else {}
    else:
        choice["message"] = {"role": "assistant", "content": text}
    if job["chat"] and job["logprobs"] is not None:
        choice["logprobs"] = logprobs
    choice["finish_reason"] = finish_reason
    if job["return_token_ids"]:
        choice["token_ids"] = token_ids
    return choice


def _logprobs(job: dict, entries: list, offset: int) -> dict | None:
    """The decode worker's per-token logprobs in OpenAI's shape: the completions one (parallel
    lists, ``top_logprobs`` a dict that also holds the chosen token, ``text_offset`` from
    ``offset``) or the chat one (``content``: a list of tokens with their bytes)."""
    if job["logprobs"] is None:
        return None
    entries = [e for e in entries if e]
    if job["chat"]:
        def token(text, logprob):
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}
        return {"content": [{**token(e["token"], e["logprob"]), "top_logprobs": [token(*t) for t in e["top"]]}
                            for e in entries]}
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(e["token"])
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{**dict(e["top"]), e["token"]: e["logprob"]} for e in entries], "text_offset": offsets}


async def _event(response: web.StreamResponse, message: dict) -> None:
    await response.write(b"data: " + json.dumps(message).encode() + b"\n\n")


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _extension(info: dict, final: dict, started: float) -> dict:
    """The ``kvwire`` field: where the KV came from and what moving it cost."""
    kv = info.get("kv", {})
    return {
        "request_id": info["request_id"], "kv_source": info.get("kv_source"), "kv_error": info.get("kv_error"),
        "prefill_worker": info["prefill_worker"], "decode_worker": info["decode_worker"],
        "ttft_s": info.get("ttft_s"), "prefill_s": info.get("prefill_s"), "rebuild_s": info.get("rebuild_s"),
        "decode_s": final.get("decode_s"), "total_s": time.perf_counter() - started,
        "kv_bytes": kv.get("raw_bytes", 0), "kv_wire_bytes": kv.get("wire_bytes", 0),
        "kv_transfer_s": kv.get("transfer_s"), "kv_after_prefill_s": kv.get("after_prefill_s"),
        "kv_goodput_bps": kv.get("goodput_bps"), "link_goodput_bps": kv.get("link_goodput_bps"),
        "link_rtt_ms": kv.get("rtt_ms"), "link_retransmits": kv.get("retransmits"),
        "route": info.get("route"), "prefix": info.get("prefix"),
    }


def _route_info(decision: Decision, fleet: Fleet) -> dict:
    """Which prefill pool, why, and how much each side reuses."""
    cluster = decision.route.cluster
    return {
        "prefill_pool": cluster or "local", "reason": decision.route.reason,
        "threshold_tokens": fleet.clusters[cluster].controller.threshold_tokens if cluster else None,
        "incremental_tokens": decision.route.placement.incremental_tokens,
        "prefill_cached_tokens": decision.route.placement.cached_tokens,
        "decode_cached_tokens": decision.decode.cached_tokens,
    }


def _client_error(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    return describe(exc)
