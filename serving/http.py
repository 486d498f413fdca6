"""What every serving process shares over HTTP: error bodies, /health, /metrics, startup.

Errors use the OpenAI shape ``{"error": {"type", "message"}}``; a kvwire failure keeps
its class name as the type (``PeerLostError``...) so the client sees what broke.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from typing import Callable

import msgspec
from aiohttp import web

from . import protocol
from .errors import UpstreamError
from .metrics import Registry

log = logging.getLogger(__name__)

INVALID_REQUEST = "invalid_request_error"
UNAVAILABLE = "worker_unavailable"  # a worker that cannot be reached, or broke its answer off



def error_body(error_type: str, message: str, **extra) -> dict:
    return {"error": {"type": error_type, "message": message, **extra}}


def json_error(status: int, error_type: str, message: str, **extra) -> web.Response:
    return web.json_response(error_body(error_type, message, **extra), status=status)


def answer(message: protocol.Message, status: int = 200) -> web.Response:
    """A worker's typed answer (serving.protocol) as its JSON body."""
    return web.Response(body=protocol.encode(message), status=status, content_type="application/json")


def upstream_response(exc: UpstreamError) -> web.Response:
    """A worker's failure as the router's HTTP error: its status, type and message."""
    return json_error(exc.status, exc.error_type, str(exc))


def worker_error(status: int, data: bytes, fallback: str) -> UpstreamError:
    """A worker's error answer (OpenAI's shape) as an UpstreamError keeping its type and
    message; ``fallback`` says what answered where the body is not that shape."""
    try:
        body = json.loads(data)
    except ValueError:
        body = None
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        return UpstreamError(status, str(error.get("type") or UNAVAILABLE), str(error.get("message") or fallback))
    return UpstreamError(status, UNAVAILABLE, f"{fallback}: {bytes(data[:200])!r}")


def describe(exc: BaseException) -> str:
    """``"ClassName: message"``, the form errors travel in between processes."""
    return f"{type(exc).__name__}: {exc}"


def base_app(role: str, registry: Registry, health: Callable[[], dict | protocol.WorkerHealth],
             extra_metrics: Callable[[], list]) -> web.Application:
    """An aiohttp app with GET /health and GET /metrics for ``role``.

    ``health()`` may set ``"status"`` to something other than ``"ok"`` (the router's
    ``"degraded"``): /health then answers 503, so a load balancer stops sending traffic.
    """
    app = web.Application(client_max_size=64 << 20)

    async def get_health(request: web.Request) -> web.Response:
        said = health()  # a worker's protocol.WorkerHealth, or the router's own (larger) dict
        body = {"status": "ok", "role": role, **(msgspec.to_builtins(said) if isinstance(said, msgspec.Struct) else said)}
        return web.json_response(body, status=200 if body["status"] == "ok" else 503)

    async def get_metrics(request: web.Request) -> web.Response:
        text = registry.render(extra_metrics())
        return web.Response(text=text, content_type="text/plain", charset="utf-8", headers={"X-Role": role})

    app.router.add_get("/health", get_health)
    app.router.add_get("/metrics", get_metrics)
    return app


async def start(app: web.Application, sock: socket.socket) -> tuple[web.AppRunner, str]:
    """Serve ``app`` on a listening socket (serving.flags.bind); return the runner and base URL."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.SockSite(runner, sock)
    await site.start()
    host, bound = sock.getsockname()[:2]
    url_host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)
    url_host = f"[{url_host}]" if ":" in url_host else url_host
    return runner, f"http://{url_host}:{bound}"


async def serve_forever(app: web.Application, sock: socket.socket, on_ready: Callable[[str], None]) -> None:
    """Serve until cancelled, calling ``on_ready(url)`` once listening."""
    runner, url = await start(app, sock)
    on_ready(url)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
