"""The router in front of vLLM OpenAI servers that run ``KVWireConnector``.

It drives them as vLLM's disaggregated-serving proxy drives NIXL, plus what a push needs:
the prefill server gets the request with ``max_tokens=1`` and ``kv_transfer_params``
``{"do_remote_decode": true, "kvwire": {"request_id", "decode"}}`` (the decode server's
kvwire address, from ``decode_kv`` or, when unset, the prefill server's own ``decode``
option), and the decode server gets the client's request with the parameters the
prefill server answered. The client gets the decode server's answer as is, plus
``kvwire``: the route, the prefill side's push, and what the decode side did with it
(``loaded_tokens``, or the error and whether it recomputed).

Servers running vLLM's own NixlConnector (``--engine vllm-nixl``) are driven as vLLM's
proxy drives them: the prefill request asks ``do_remote_decode`` and the decode server
pulls the blocks the prefill server's answer names. Either way the router times each
leg (``prefill_s``; a streamed decode's ``decode_first_s``: sent to its first token).

The control loop reads each server's Prometheus ``/metrics``: kvwire's per-peer link
gauges (bytes, goodput, RTT, retransmits) become the ``PeerMetrics`` the PrfaaS threshold
controller is fed, and ``vllm:num_requests_waiting`` the queue.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid

import aiohttp
import msgspec
from aiohttp import web

from kvwire.errors import MISCONFIGURATIONS
from kvwire.metrics import PeerMetrics
from kvwire.transport.base import LinkStats

from .errors import Unreachable, UpstreamError
from .http import UNAVAILABLE, describe, worker_error

log = logging.getLogger(__name__)

_SAMPLE = re.compile(r'^(?P<name>[a-zA-Z_:][\w:]*)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)')
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_samples(text: str):
    """(name, labels, value) of each sample in a Prometheus text page."""
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match is None:
            continue
        try:
            value = float(match["value"])
        except ValueError:
            continue
        yield match["name"], dict(_LABEL.findall(match["labels"] or "")), value


def parse_metrics(text: str, worker: str) -> tuple[list[PeerMetrics], float]:
    """kvwire's link gauges per peer and the waiting requests, from Prometheus text."""
    peers: dict[str, dict[str, float]] = {}
    waiting = 0.0
    for name, labels, value in parse_samples(text):
        if name == "vllm:num_requests_waiting":
            waiting += value
        elif name.startswith("vllm:kvwire_link_") and "peer" in labels:
            peers.setdefault(labels["peer"], {})[name.removeprefix("vllm:kvwire_link_")] = value
    metrics = []
    for peer, values in peers.items():
        link = LinkStats(rtt_ms=values.get("rtt_ms", 0.0), rttvar_ms=0.0, min_rtt_ms=values.get("min_rtt_ms", 0.0),
                         cwnd_segments=0, total_retrans=int(values.get("retransmits", 0)), lost=0,
                         delivery_rate_bps=0.0, bytes_retrans=0)
        metrics.append(PeerMetrics(f"{worker}>{peer}", int(values.get("bytes", 0)), 0, 0,
                                   values.get("goodput_bps", 0.0), (link,)))
    return metrics, waiting


async def complete(router, request: web.Request, job: dict, decision, info: dict) -> web.StreamResponse:
    """Prefill on ``decision``'s prefill server, decode on its decode server, answer the client."""
    prefill_url, decode_url = decision.route.placement.worker, decision.decode.worker
    started = time.perf_counter()
    kv_id = f"{job['id']}-{uuid.uuid4().hex[:8]}"
    target = {"request_id": kv_id}
    address = decision.kv_address
    if address:
        target["decode"] = address
    body = dict(job["body"])
    if not job["chat"]:  # a chat's messages go to both servers, each renders them with the model's template
        body["prompt"] = job["prompt_token_ids"] if isinstance(job["prompt"], list) else job["prompt"]
    path = "/v1/chat/completions" if job["chat"] else "/v1/completions"
    nixl = router.fleet.workers[decode_url].engine == "vllm-nixl"
    if nixl:  # the prefill server keeps the blocks; the decode server pulls what its answer names
        transfer = {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
                    "remote_block_ids": None, "remote_host": None, "remote_port": None}
    else:
        transfer = {"do_remote_decode": True, "kvwire": target}
    prefill_body = {**body, "max_tokens": 1, "stream": False, "kv_transfer_params": transfer}
    for name in ("stream_options", "max_completion_tokens"):
        prefill_body.pop(name, None)
    router.fleet.acquire(prefill_url)
    try:
        prefilled = await _post_json(router, prefill_url + path, prefill_body, router.options.prefill_timeout_s,
                                     "prefill")
    finally:
        router.fleet.release(prefill_url)
    params = prefilled.get("kv_transfer_params")
    if not params or not (nixl or "kvwire" in params):
        connector, which = ("NixlConnector", "") if nixl else ("KVWireConnector", "kvwire ")
        raise UpstreamError(502, "kv_transfer_params_missing",
                                    f"prefill server {prefill_url} answered without {which}kv_transfer_params: "
                                    f"is it running {connector} with kv_role kv_producer or kv_both?")
    if not nixl:
        push = info["push"] = params["kvwire"]
        refuse_misconfigured(router, push.get("error"), prefill_url, decode_url)
        if push.get("error") and router.options.kv_fallback == "error":
            raise UpstreamError(502, "KVWireError", f"the prefill server could not push the KV: {push['error']}")
    info["prefill_s"] = time.perf_counter() - started
    decode_body = {**body, "kv_transfer_params": params}
    if job["stream"]:
        return await _relay_stream(router, request, decode_url + path, decode_body, info, started)
    answer = await _post_json(router, decode_url + path, decode_body, router.options.prefill_timeout_s, "decode")
    report = (answer.get("kv_transfer_params") or {}).get("kvwire", {})
    refuse_misconfigured(router, report.get("error"), prefill_url, decode_url)
    if report.get("error") and router.options.kv_fallback == "error":
        raise UpstreamError(502, report["error"].split(":", 1)[0],
                                    f"the KV of request {kv_id} did not arrive: {report['error']}")
    answer["kvwire"] = {**info, "load": report, "total_s": time.perf_counter() - started}
    router.account(info, answer.get("usage", {}).get("completion_tokens", 0), "200")
    return web.json_response(answer)


def refuse_misconfigured(router, error: str | None, prefill_url: str, decode_url: str) -> None:
    """A push refused for a misconfiguration (another secret, another model) is an error,
    never a success the decode server recomputed; the pair is refused until checked again."""
    kind = next((cls.__name__ for cls in MISCONFIGURATIONS if cls.__name__ in (error or "")), None)
    if kind is None:
        return
    message = f"prefill server {prefill_url} cannot send KV to decode server {decode_url}: {error}"
    log.error("%s", message)
    router.fleet.refuse_pair(prefill_url, decode_url, kind, message)
    raise UpstreamError(502, kind, f"{message} (a misconfiguration: not recomputed)")


async def tokenize(router, url: str, payload: dict, timeout) -> list[int]:
    """vLLM's ``/tokenize``: the prompt's token ids (a chat's through the server's template)."""
    try:
        async with router.session.post(url + "/tokenize", json=payload, timeout=timeout) as response:
            data = await response.read()
            status = response.status
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        raise Unreachable(502, UNAVAILABLE, f"prefill server {url} is unreachable: {describe(exc)}") from None
    if status != 200:
        raise worker_error(status, data, f"prefill server {url} answered HTTP {status}")
    try:
        return msgspec.json.decode(data, type=_Tokens).tokens
    except msgspec.ValidationError as exc:
        raise UpstreamError(502, UNAVAILABLE, f"prefill server {url} answered /tokenize wrongly: {exc}") from None
    except msgspec.DecodeError as exc:
        raise Unreachable(502, UNAVAILABLE, f"prefill server {url} answered /tokenize with no JSON: {exc}") from None


class _Tokens(msgspec.Struct):
    """The part of vLLM's /tokenize answer the router reads."""

    tokens: list[int]


async def _post_json(router, url: str, body: dict, timeout_s: float, role: str) -> dict:
    timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=router.options.connect_timeout_s)
    try:
        async with router.session.post(url, json=body, timeout=timeout) as response:
            text = await response.text()
            status = response.status
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        raise UpstreamError(502, "worker_unavailable",
                                    f"{role} server {url} is unreachable: {type(exc).__name__}: {exc}") from None
    try:
        answer = json.loads(text)
    except json.JSONDecodeError:
        raise UpstreamError(502, "worker_unavailable",
                                    f"{role} server {url} answered HTTP {status} with no JSON: {text[:200]}") from None
    if status != 200:
        error = answer.get("error", answer) if isinstance(answer, dict) else {}
        message = error.get("message", text[:300]) if isinstance(error, dict) else text[:300]
        raise UpstreamError(status, (error.get("type") if isinstance(error, dict) else None)
                                    or "upstream_error", f"{role} server {url}: {message}")
    return answer


async def _relay_stream(router, request, decode_url: str, body: dict, info: dict, started: float):
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=router.options.connect_timeout_s,
                                    sock_read=router.options.token_timeout_s)
    sent = time.perf_counter()
    try:
        upstream = await router.session.post(decode_url, json=body, timeout=timeout)
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        raise UpstreamError(502, "worker_unavailable",
                                    f"decode server {decode_url} is unreachable: {type(exc).__name__}: {exc}") from None
    if upstream.status != 200:
        text = await upstream.text()
        upstream.release()
        raise UpstreamError(upstream.status, "upstream_error", f"decode server {decode_url}: {text[:300]}")
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    try:
        async for line in upstream.content:
            if "ttft_s" not in info and line.startswith(b"data: {"):
                now = time.perf_counter()
                info.update(ttft_s=now - started, decode_first_s=now - sent)
            if line.startswith(b"data: [DONE]"):
                info["total_s"] = time.perf_counter() - started
                await response.write(b"data: " + json.dumps({"kvwire": info}).encode() + b"\n\n")
            await response.write(line)
    finally:
        upstream.release()
    await response.write_eof()
    router.account(info, 0, "200")
    return response
