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

from .app import Router

__all__ = ["Router"]
