"""The router's calls to kvwire workers: typed messages out (serving.protocol), typed
answers back, and a decode worker's token stream read event by event. Every failure
becomes an UpstreamError naming the worker and what it did wrong."""

from __future__ import annotations

import asyncio
import logging

import aiohttp

from .. import protocol
from ..errors import BadRequest, Unreachable, UpstreamError
from ..http import UNAVAILABLE, describe, worker_error

log = logging.getLogger("serving.router")

WORKER_PROTOCOL_ERROR = "worker_protocol_error"  # a worker answered, but not the message it should have
JSON_HEADERS = {"Content-Type": "application/json"}


async def call_worker(session: aiohttp.ClientSession, url: str, path: str, message: protocol.Message,
                      answer_type, timeout, role: str):
    """POST ``message`` to a worker and decode its typed answer. A worker that cannot be
    reached is Unreachable (502); one that answers an error, its UpstreamError; one
    whose answer is not the message it should be, a 502 naming the field."""
    try:
        async with session.post(url + path, data=protocol.encode(message), headers=JSON_HEADERS,
                                timeout=timeout) as response:
            data = await response.read()
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        raise Unreachable(502, UNAVAILABLE, f"{role} {url} is unreachable: {client_error(exc)}") from None
    if response.status != 200:
        raise worker_error(response.status, data, f"{role} {url} answered HTTP {response.status}")
    try:
        return protocol.decode(data, answer_type)
    except BadRequest as exc:
        raise UpstreamError(502, WORKER_PROTOCOL_ERROR, f"{role} {url} answered {path} wrongly: {exc}") from None


async def open_decode(session: aiohttp.ClientSession, decode_url: str, decode_job: protocol.DecodeJob, info: dict,
                      connect_timeout_s: float, token_timeout_s: float) -> aiohttp.ClientResponse:
    """The decode worker's token stream for ``decode_job`` (its status line read); UpstreamError
    carrying the KV error's type where the transfer had failed too."""
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout_s, sock_read=token_timeout_s)
    try:
        response = await session.post(decode_url + "/internal/decode", data=protocol.encode(decode_job),
                                      headers=JSON_HEADERS, timeout=timeout)
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        message = f"decode worker {decode_url} is unreachable: {client_error(exc)}"
        if decode_job.kv_error:
            message += f"; the KV transfer had failed with {decode_job.kv_error}"
        log.warning("request %s: %s; answered 502, nothing recomputed", decode_job.request_id, message)
        raise UpstreamError(502, info.get("kv_error_type", UNAVAILABLE), message) from None
    if response.status != 200:
        try:
            data = await response.read()
        except (aiohttp.ClientError, asyncio.TimeoutError):
            data = b""
        response.release()
        raise worker_error(response.status, data, f"decode worker {decode_url} answered HTTP {response.status}")
    info["prompt_tokens"] = len(decode_job.prompt_token_ids)
    return response


async def next_event(upstream: aiohttp.ClientResponse, timeout_s: float, *expected: type) -> protocol.StreamEvent:
    """The decode worker's next stream event, one of ``expected``; UpstreamError if the
    stream broke, the worker reports a failure, or it sent another event than it should."""
    origin = upstream.url.origin()
    try:
        line = await asyncio.wait_for(upstream.content.readline(), timeout_s)
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        raise UpstreamError(502, UNAVAILABLE, f"decode stream from {origin} broke: {client_error(exc)}") from None
    if not line:
        raise UpstreamError(502, UNAVAILABLE, f"decode worker {origin} closed the stream early")
    try:
        event = protocol.decode(line, protocol.DecodeEvent)
    except BadRequest as exc:
        raise UpstreamError(502, WORKER_PROTOCOL_ERROR, f"decode worker {origin} sent {exc}") from None
    if isinstance(event, protocol.DecodeFailed):
        raise UpstreamError(502, event.error.type, event.error.message)
    if not isinstance(event, expected):
        raise UpstreamError(502, WORKER_PROTOCOL_ERROR, f"decode worker {origin} sent a {type(event).__name__} "
                            f"where a {' or '.join(kind.__name__ for kind in expected)} belongs")
    return event


def client_error(exc: BaseException) -> str:
    """An aiohttp failure in a few words ("timed out" for a timeout, which says nothing itself)."""
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    return describe(exc)
