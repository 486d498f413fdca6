"""A minimal blocking client for the router's completions API (demo and tests).

Standard library only, so that checking a deployment needs nothing installed.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field


@dataclass
class Completion:
    """One completion as the client saw it. ``events`` holds the SSE messages if streamed."""

    status: int
    body: dict = field(default_factory=dict)
    events: list = field(default_factory=list)
    ttft_s: float | None = None
    total_s: float = 0.0

    @property
    def token_ids(self) -> list[int]:
        if self.events:
            return [t for event in self.events for t in event.get("choices", [{}])[0].get("token_ids", [])]
        return self.body["choices"][0]["token_ids"]

    @property
    def kvwire(self) -> dict:
        return (self.events[-1] if self.events else self.body).get("kvwire", {})


def _request(url: str, body) -> urllib.request.Request:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"}, method="POST")


def complete(base_url: str, body, timeout_s: float = 60.0) -> Completion:
    """POST /v1/completions; streams (recording time to first token) if ``body["stream"]``."""
    started = time.perf_counter()
    try:
        response = urllib.request.urlopen(_request(base_url + "/v1/completions", body), timeout=timeout_s)
    except urllib.error.HTTPError as exc:
        return Completion(exc.code, json.loads(exc.read() or b"{}"), total_s=time.perf_counter() - started)
    with response:
        if not response.headers.get("Content-Type", "").startswith("text/event-stream"):
            return Completion(response.status, json.loads(response.read()), total_s=time.perf_counter() - started)
        result = Completion(response.status)
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                break
            event = json.loads(line[6:])
            is_token = bool(event.get("choices")) and event["choices"][0].get("finish_reason") is None
            if result.ttft_s is None and is_token:
                result.ttft_s = time.perf_counter() - started
            result.events.append(event)
        result.total_s = time.perf_counter() - started
        return result


def get(base_url: str, path: str, timeout_s: float = 10.0) -> tuple[int, str]:
    """(status, body text) of a GET."""
    try:
        with urllib.request.urlopen(base_url + path, timeout=timeout_s) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def burst(ask, num_requests: int, timeout_s: float = 1200.0) -> float:
    """Call ``ask(i)`` for every i at once, one thread each; the seconds until all returned."""
    import threading

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(num_requests)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout_s)
    return time.perf_counter() - started
