"""What the vLLM tests share: prompts, the tokens each answer says it took from kvwire,
and NIXL's reference tokens. Test modules import from here, never from conftest (fixtures
only) or from one another."""

from __future__ import annotations

import random

import pytest

from .engines import NixlPD, free_port

__all__ = ["MAX_TOKENS", "PAIR_PREFILL_ARGS", "free_port", "loaded", "nixl_reference", "prompt", "taken"]

MAX_TOKENS = 16
PAIR_PREFILL_ARGS = ("--max-num-batched-tokens", "256")  # the prefill side chunks prompts into 256-token steps


def loaded(outputs) -> list[int]:
    """Prompt tokens each decode response says it took from kvwire."""
    return [out["kv_transfer_params"]["kvwire"]["loaded_tokens"] for out in outputs]


def taken(outputs) -> list[int]:
    """Prompt tokens each decode response did not compute: taken from kvwire, or found in
    its own prefix cache (prompts sharing a prefix may hit it there, depending on what it
    still holds from earlier requests: a machine's timing, not something to assert)."""
    reports = [out["kv_transfer_params"]["kvwire"] for out in outputs]
    return [r["loaded_tokens"] + r.get("local_tokens", 0) for r in reports]


def prompt(length: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 2000) for _ in range(length)]


def nixl_reference(name: str, model: str, prompts, *, log_dir, **settings) -> NixlPD:
    """NIXL's P/D tokens for ``prompts`` (in that order), computed now (engines stopped after)."""
    pytest.importorskip("nixl", reason="nixl is in the test extra (vLLM's NixlConnector is the reference)")
    return NixlPD.run(name, model, prompts, MAX_TOKENS, log_dir=log_dir, **settings)
