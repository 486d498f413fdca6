"""The OpenAI surface: a completion or chat request checked field by field (OpenAI's error
texts), and the shapes of the answers: a choice, a streamed chunk, logprobs, usage, and the
``kvwire`` field that says where the KV came from and what moving it cost."""

from __future__ import annotations

import json
import time
import uuid

from aiohttp import web

from .. import protocol
from ..errors import BadRequest
from ..fleet import Decision, Fleet
from ..prompts import (
    check_messages,
    check_prompt_shape,
    parse_logprobs,
    parse_max_tokens,
    parse_sampling,
    parse_stop,
)


def parse_request(body: dict, *, chat: bool = False) -> dict:
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
        "sampling": protocol.SamplingParams.of(sampling),
        "logprobs": logprobs, "echo": bool(body.get("echo")),
        "stop": stop, "stop_token_ids": stop_token_ids, "stream": body.get("stream", False),
        "include_usage": bool((body.get("stream_options") or {}).get("include_usage", False)),
        "return_token_ids": body.get("return_token_ids", False),
    }


def chunk(job: dict, choices: list) -> dict:
    kind = "chat.completion.chunk" if job["chat"] else "text_completion"
    return {"id": job["id"], "object": kind, "created": job["created"], "model": job["model"], "choices": choices}


def choice(job: dict, text: str, finish_reason: str | None, token_ids: list[int], *, delta: bool,
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


def choice_logprobs(job: dict, entries: list, offset: int) -> dict | None:
    """The decode worker's per-token logprobs in OpenAI's shape: the completions one (parallel
    lists, ``top_logprobs`` a dict that also holds the chosen token, ``text_offset`` from
    ``offset``) or the chat one (``content``: a list of tokens with their bytes)."""
    if job["logprobs"] is None:
        return None
    entries = [e for e in entries if e is not None]
    if job["chat"]:
        def token(text, logprob):
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}
        return {"content": [{**token(e.token, e.logprob), "top_logprobs": [token(*t) for t in e.top]}
                            for e in entries]}
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(e.token)
    return {"tokens": [e.token for e in entries], "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{**dict(e.top), e.token: e.logprob} for e in entries], "text_offset": offsets}


async def sse_event(response: web.StreamResponse, message: dict) -> None:
    await response.write(b"data: " + json.dumps(message).encode() + b"\n\n")


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def kvwire_extension(info: dict, final: protocol.DecodeFinished, started: float) -> dict:
    """The ``kvwire`` field: where the KV came from and what moving it cost."""
    kv = info.get("kv", {})
    return {
        "request_id": info["request_id"], "kv_source": info.get("kv_source"), "kv_error": info.get("kv_error"),
        "prefill_worker": info["prefill_worker"], "decode_worker": info["decode_worker"],
        "ttft_s": info.get("ttft_s"), "prefill_s": info.get("prefill_s"), "rebuild_s": info.get("rebuild_s"),
        "decode_s": final.decode_s, "total_s": time.perf_counter() - started,
        "kv_bytes": kv.get("raw_bytes", 0), "kv_wire_bytes": kv.get("wire_bytes", 0),
        "kv_transfer_s": kv.get("transfer_s"), "kv_after_prefill_s": kv.get("after_prefill_s"),
        "kv_goodput_bps": kv.get("goodput_bps"), "link_goodput_bps": kv.get("link_goodput_bps"),
        "link_rtt_ms": kv.get("rtt_ms"), "link_retransmits": kv.get("retransmits"),
        "route": info.get("route"), "prefix": info.get("prefix"),
    }


def route_info(decision: Decision, fleet: Fleet) -> dict:
    """Which prefill pool, why, and how much each side reuses."""
    cluster = decision.route.cluster
    return {
        "prefill_pool": cluster or "local", "reason": decision.route.reason,
        "threshold_tokens": fleet.clusters[cluster].controller.threshold_tokens if cluster else None,
        "incremental_tokens": decision.route.placement.incremental_tokens,
        "prefill_cached_tokens": decision.route.placement.cached_tokens,
        "decode_cached_tokens": decision.decode.cached_tokens,
    }
