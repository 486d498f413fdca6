"""What answers at a worker URL: a kvwire-serve worker of some role, a vLLM server, or neither.

The router asks this of every URL at start (a URL given in the wrong role is refused
there, in one line) and on every poll (a worker restarted with another model, secret or
role shows in ``/health`` at once). A kvwire-serve process says what it is in its
``/health`` (role, model, architecture, dtype, layout fingerprint, KV address, maximum
length); a vLLM server running KVWireConnector says its kv_role and kvwire listen address
in the ``vllm:kvwire_info`` series of its ``/metrics``, and its model and maximum length
in ``/v1/models``. A vLLM server running vLLM's own NixlConnector says nothing of its
connector: the router takes it as one only when told (``--engine vllm-nixl``), to serve the
same servers the way vLLM's proxy drives NIXL (for comparing the two connectors).
"""

from __future__ import annotations

import asyncio
import urllib.parse
from dataclasses import dataclass

import aiohttp
import msgspec

from .errors import NotAWorker
from .protocol import WorkerHealth

ROLE_OF_KV_ROLE = {"kv_producer": "prefill", "kv_consumer": "decode", "kv_both": "prefill or decode"}
VLLM_ENGINES = ("vllm", "vllm-nixl")  # vLLM OpenAI servers with KVWireConnector, or with NixlConnector
WHAT = {"prefill": "a kvwire-serve prefill worker", "decode": "a kvwire-serve decode worker",
        "router": "a kvwire-serve router"}



@dataclass(frozen=True)
class Identity:
    """One worker as it describes itself."""

    engine: str  # "kvwire" (a kvwire-serve process), "vllm" (KVWireConnector) or "vllm-nixl"
    role: str  # "prefill", "decode", "router"; a vLLM server's from its kv_role (NIXL's: either)
    model: str = ""
    architecture: str | None = None
    dtype: str | None = None
    layout_fingerprint: str | None = None
    kv_address: str | None = None  # where its kvwire Receiver listens (decode), as others dial it
    max_model_len: int | None = None

    def serves(self, role: str) -> bool:
        return role in self.role.split(" or ")

    @property
    def is_vllm(self) -> bool:
        return self.engine in VLLM_ENGINES

    def describe(self) -> str:
        if self.engine == "vllm-nixl":
            return "a vLLM server without KVWireConnector (NixlConnector, as --engine vllm-nixl says)"
        if self.engine == "vllm":
            return f"a vLLM server with KVWireConnector as {self.role} (kv_role)"
        return WHAT.get(self.role, f"a kvwire-serve {self.role}")


async def identify(session: aiohttp.ClientSession, url: str, timeout: aiohttp.ClientTimeout,
                   nixl: bool = False) -> tuple[Identity, str | None]:
    """What serves ``url``, and a vLLM server's Prometheus page read to learn it (None for a
    kvwire-serve process), so that a poll reads it once. aiohttp errors (nothing answers)
    propagate; NotAWorker says what answered when it is not a kvwire-serve process or a vLLM
    server with KVWireConnector (or, with ``nixl``, any vLLM server without it)."""
    async with session.get(url + "/health", timeout=timeout) as response:
        status, text = response.status, await response.text()
    try:
        health = msgspec.json.decode(text, type=WorkerHealth) if text.strip() else None
    except (msgspec.DecodeError, msgspec.ValidationError):
        health = None  # not a kvwire-serve process: perhaps a vLLM server
    if health is not None:
        return Identity("kvwire", health.role, health.model, health.architecture, health.dtype,
                        health.layout_fingerprint, health.kv_address, health.max_model_len), None
    async with session.get(url + "/v1/models", timeout=timeout) as response:
        models = await response.json(content_type=None) if response.status == 200 else None
    if not (isinstance(models, dict) and models.get("data")):
        raise NotAWorker(f"neither a kvwire-serve worker nor an OpenAI server (GET /health answered HTTP {status}"
                         f"{': ' + repr(text[:80]) if text.strip() else ''})")
    model = models["data"][0]
    async with session.get(url + "/metrics", timeout=timeout) as response:
        metrics_status, metrics = response.status, await response.text()
    if metrics_status != 200:
        raise NotAWorker(f"an OpenAI server serving {model.get('id')!r} whose GET /metrics answered HTTP "
                         f"{metrics_status} (kvwire reads its connector's info there)")
    info = kvwire_info(metrics)
    if info is None and nixl:
        return Identity("vllm-nixl", "prefill or decode", str(model.get("id", "")),
                        max_model_len=model.get("max_model_len")), metrics
    if info is None:
        raise NotAWorker(f"an OpenAI server serving {model.get('id')!r} without KVWireConnector (its /metrics has "
                         "no vllm:kvwire_info; vLLM servers running NixlConnector need --engine vllm-nixl)")
    role = ROLE_OF_KV_ROLE.get(info.get("kv_role", ""), info.get("kv_role", "?"))
    return Identity("vllm", role, str(model.get("id", "")), kv_address=advertised(info.get("listen"), url),
                    max_model_len=model.get("max_model_len")), metrics


def kvwire_info(metrics_text: str) -> dict | None:
    """The labels of ``vllm:kvwire_info`` in a Prometheus text page (None: no such series)."""
    from .vllm_upstream import parse_samples

    for name, labels, _ in parse_samples(metrics_text):
        if name == "vllm:kvwire_info":
            return labels
    return None


def advertised(listen: str | None, url: str) -> str | None:
    """A listen address as others dial it: a wildcard host becomes the URL's host; port 0
    (any free port) cannot be known from outside."""
    if not listen:
        return None
    host, _, port = listen.rpartition(":")
    if port in ("", "0"):
        return None
    if host in ("0.0.0.0", "", "::", "[::]"):
        host = urllib.parse.urlsplit(url).hostname or host
        host = f"[{host}]" if ":" in host else host
    return f"{host}:{port}"


async def wrong_roles(urls: dict[str, tuple[str, str]], timeout_s: float, engine: str = "auto") -> list[str]:
    """For each ``url: (flag, role)`` that answers as something else, one line naming the flag
    and what answered. A URL nobody answers at is not wrong (the worker may still be starting)."""
    timeout = aiohttp.ClientTimeout(total=timeout_s)

    async def check(session, url, flag, role):
        try:
            identity, _ = await identify(session, url, timeout, nixl=engine == "vllm-nixl")
        except (aiohttp.ClientError, TimeoutError):
            return None
        except NotAWorker as exc:
            return f"{flag} {url} is {exc}"
        if not identity.serves(role):
            return f"{flag} {url} is {identity.describe()}, not a {role} worker"
        if engine != "auto" and identity.engine != engine:
            return f"{flag} {url} is {identity.describe()}, but the router was told --engine {engine}"
        return None

    async with aiohttp.ClientSession() as session:
        found = await asyncio.gather(*(check(session, url, flag, role) for url, (flag, role) in urls.items()))
    return [line for line in found if line]
