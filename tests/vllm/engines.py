"""How the connector tests configure and drive their vLLM engines (``serving.vllm_engine``)."""

from __future__ import annotations

import json

from serving.vllm_engine import ROOT, Engine, start_all  # noqa: F401  (the tests' engines)


def consumer_args(listen: str, *, secret_file=None, prefix_caching=True, policy="recompute", **extra) -> list[str]:
    config = {"listen": listen, "load_timeout_s": 5, "lease_s": 4, **extra}
    if secret_file is not None:
        config["secret_file"] = str(secret_file)
    return ["--kv-role", "kv_consumer", "--kv-extra", json.dumps(config), "--load-failure-policy", policy,
            *(["--prefix-caching"] if prefix_caching else [])]


def producer_args(decode: str | None = None, *, secret_file=None, prefix_caching=True, **extra) -> list[str]:
    config = {**({"decode": decode} if decode else {}), **extra}
    if secret_file is not None:
        config["secret_file"] = str(secret_file)
    return ["--kv-role", "kv_producer", "--kv-extra", json.dumps(config),
            *(["--prefix-caching"] if prefix_caching else [])]


def disaggregated(prefill: Engine, decode: Engine, prompts, max_tokens: int, targets=None):
    """The proxy's two requests: prefill with max_tokens=1, then decode with its parameters."""
    first = [{"do_remote_decode": True, **({"kvwire": t} if t else {})} for t in (targets or [None] * len(prompts))]
    prefilled = prefill.generate(prompts, 1, first)
    return prefilled, decode.generate(prompts, max_tokens, [p["kv_transfer_params"] for p in prefilled])
