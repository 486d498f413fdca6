"""Relaying a decode worker's tokens to the client: collected into one JSON answer, or
streamed as server-sent events; a failure mid-stream becomes an error event."""

from __future__ import annotations

import time

from aiohttp import web

from .. import protocol
from ..errors import UpstreamError
from ..http import error_body, upstream_response
from . import openai_api as api
from .workers import next_event


async def collect(router, job: dict, upstream, info: dict, started: float) -> web.Response:
    """The whole completion at once: every token read, then one JSON answer."""
    tokens, text, logprobs = [], [job.get("echo_text", "")], []
    try:
        while True:
            event = await next_event(upstream, router.options.token_timeout_s, protocol.TokenEvent,
                                     protocol.DecodeFinished)
            if isinstance(event, protocol.DecodeFinished):
                final = event
                break
            if not tokens:
                info["ttft_s"] = time.perf_counter() - started
            tokens.append(event.token)
            text.append(event.text)
            logprobs.append(event.logprobs)
    except UpstreamError as exc:
        router.num_requests.inc(1, str(exc.status))
        return upstream_response(exc)
    choice = api.choice(job, "".join(text), final.finish_reason, tokens, delta=False,
                        logprobs=api.choice_logprobs(job, logprobs, len(text[0])))
    router.account(info, len(tokens), "200")
    return web.json_response({
        "id": job["id"], "object": "chat.completion" if job["chat"] else "text_completion",
        "created": job["created"], "model": job["model"], "choices": [choice],
        "usage": api.usage(info["prompt_tokens"], len(tokens)), "kvwire": api.kvwire_extension(info, final, started),
    })


async def relay_sse(router, request, job: dict, upstream, info: dict, started: float) -> web.StreamResponse:
    """Each token as a server-sent event as it comes, then the usage and ``[DONE]``."""
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    num_tokens, offset = 0, len(job.get("echo_text", ""))
    if offset:
        await api.sse_event(response, api.chunk(job, [api.choice(job, job["echo_text"], None, [], delta=True)]))
    try:
        while True:
            event = await next_event(upstream, router.options.token_timeout_s, protocol.TokenEvent,
                                     protocol.DecodeFinished)
            if isinstance(event, protocol.DecodeFinished):
                break
            if num_tokens == 0:
                info["ttft_s"] = time.perf_counter() - started
            num_tokens += 1
            logprobs = api.choice_logprobs(job, [event.logprobs], offset)
            offset += len(event.logprobs.token) if logprobs else 0
            piece = api.choice(job, event.text, None, [event.token], delta=True, logprobs=logprobs)
            await api.sse_event(response, api.chunk(job, [piece]))
    except UpstreamError as exc:
        router.account(info, num_tokens, str(exc.status))
        await api.sse_event(response, error_body(exc.error_type, str(exc)))
        await response.write_eof()
        return response
    chunk = api.chunk(job, [api.choice(job, "", event.finish_reason, [], delta=True)])
    chunk.update(usage=api.usage(info["prompt_tokens"], num_tokens), kvwire=api.kvwire_extension(info, event, started))
    await api.sse_event(response, chunk)
    if job["include_usage"]:  # OpenAI's stream_options: a last chunk with no choices, only the usage
        await api.sse_event(response, {**api.chunk(job, []), "usage": api.usage(info["prompt_tokens"], num_tokens)})
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    router.account(info, num_tokens, "200")
    return response
