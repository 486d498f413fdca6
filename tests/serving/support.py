"""What the serving tests share: model names, a prompt, and the router and health helpers.

Test modules import from here, never from one another or from conftest (fixtures only).
"""

from __future__ import annotations

import json
import time

import numpy as np

from serving import client, launch

KIMI = "KimiLinearForCausalLM"
QWEN = "Qwen3NextForCausalLM"
PROMPT = np.random.default_rng(11).integers(3, 512, 30).tolist()


def router(prefill, decode, *extra):
    """A router process in front of ``prefill`` and ``decode`` on a free port."""
    return launch.start("router", ["--prefill", prefill.url, "--decode", decode.url, "--port", "0", *extra])


def wait_for_health(front, status: int, timeout_s: float = 10.0) -> dict:
    """Poll ``front``'s /health until it answers ``status``; its body."""
    deadline = time.monotonic() + timeout_s
    while True:
        code, text = client.get(front.url, "/health")
        if code == status:
            return json.loads(text)
        assert time.monotonic() < deadline, f"/health stayed {code}: {text}"
        time.sleep(0.05)


def prefill_count(prefill) -> float:
    """Prefills the worker has run, from its /metrics."""
    _, metrics = client.get(prefill.url, "/metrics")
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
               if line.startswith("kvwire_serve_prefill_requests_total"))
