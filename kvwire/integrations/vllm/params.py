"""What kvwire adds to vLLM's ``kv_transfer_params``, as typed structs.

The request handshake is the one vLLM's disaggregated proxy drives for NIXL: the prefill
request carries ``{"do_remote_decode": true}`` and ``max_tokens=1``, and its response's
``kv_transfer_params`` are copied into the decode request. kvwire pushes during the
prefill, so the prefill instance must know where to push before it runs: the prefill
request may name the decode instance's kvwire address and the request id to push under
in ``"kvwire"`` (else the connector's ``decode`` option and a fresh id are used), and the
response hands both on, so the decode side knows which push is its own. A decode request
built by a router that knows both in advance (before, during or after the prefill) is
the same dict.

On the decode side's response, ``"kvwire"`` reports what happened to the prompt's KV
(``loaded_tokens``, or the error and what vLLM did about it), so a silent recompute never
passes as a transfer.
"""

from __future__ import annotations

import uuid
from typing import Any

import msgspec


class PushTarget(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """``kv_transfer_params["kvwire"]`` on a prefill request or a decode request."""

    decode: str | None = None  # the decode instance's kvwire address (HOST:PORT)
    request_id: str | None = None  # the id the KV travels under
    num_tokens: int | None = None  # tokens pushed (the prompt less the one the decode side computes)
    layout: str | None = None  # the prefill instance's KVLayout fingerprint
    error: str | None = None  # the prefill side already knows the push failed
    prefill_tp: int | None = None  # the prefill instance's tensor-parallel size (pieces travel per rank pair)


class LoadReport(msgspec.Struct):
    """``kv_transfer_params["kvwire"]`` on a decode instance's response."""

    request_id: str
    loaded_tokens: int = 0  # prompt tokens whose KV came over kvwire (verified)
    local_tokens: int = 0  # prompt tokens the decode side had cached itself
    bytes: int = 0
    seconds: float = 0.0
    error: str | None = None
    recomputed: bool = False  # the load failed and vLLM recomputed the prompt


def push_target(params: dict[str, Any] | None) -> PushTarget | None:
    """The kvwire part of a request's ``kv_transfer_params`` (None if it has none);
    ValueError naming the field when it is malformed."""
    if not params or params.get("kvwire") is None:
        return None
    try:
        return msgspec.convert(params["kvwire"], PushTarget)
    except msgspec.ValidationError as exc:
        raise ValueError(f"kv_transfer_params['kvwire'] is malformed: {exc}") from None


def new_request_id(vllm_request_id: str) -> str:
    return f"{vllm_request_id}-{uuid.uuid4().hex[:12]}"


def to_dict(struct: msgspec.Struct) -> dict[str, Any]:
    return msgspec.to_builtins(struct)
