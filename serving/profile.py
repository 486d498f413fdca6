"""``kvwire-serve profile``: measure a model's prefill time, KV size and decode step here.

Writes a profile in the planner's format (serving.planner, examples/profiles/) from real
forward passes of the loaded model: for each prompt length the best of ``repeats``
prefills and the exact KV bytes of its kvwire layout; the decode step is timed on a
cache of the median length. The PrfaaS and PD prefill points are both measured on this
machine: run it once per cluster's hardware and combine the ``points`` where they differ.
"""

from __future__ import annotations

import statistics
import time

from . import progress
from .hybrid_cache import kv_layout
from .planner import Profile, parse_profile
from .steps import decode_step, prefill, warm_up


def prefill_points(loaded, lengths: list[int], repeats: int = 3, rounds: int = 3) -> list[dict]:
    """Best-of-``repeats`` prefill time per length. A longer prompt cannot prefill faster
    than a shorter one: where the times say so, another process took the CPU during the
    shorter one (seen on 2 shared cores: 5.3 s for 16 tokens, 1.5 s for 64), and those
    points are measured again, up to ``rounds`` times."""
    layout = kv_layout(loaded.config, loaded.dtype_name)
    vocab = loaded.config.vocab_size
    best = {n: float("inf") for n in lengths}

    def measure(n: int) -> None:
        ids = [3 + (i * 7919) % (vocab - 3) for i in range(n)]
        for _ in range(repeats):
            started = time.perf_counter()
            prefill(loaded.model, ids)
            best[n] = min(best[n], time.perf_counter() - started)

    with progress.count(len(lengths), "profiling prefill") as bar:
        for n in lengths:
            measure(n)
            bar.advance(f"{n} tokens: {best[n] * 1e3:.0f} ms")
    for _ in range(rounds):
        disturbed = [a for a, b in zip(lengths, lengths[1:]) if best[a] > best[b]]
        if not disturbed:
            break
        for n in disturbed:
            measure(n)
    return [{"tokens": n, "prefill_s": round(best[n], 6), "kv_bytes": layout.nbytes(n)} for n in lengths]


def decode_step_s(loaded, context_tokens: int, steps: int = 16) -> float:
    """Median seconds of one batch-1 decode step after a ``context_tokens`` prompt."""
    ids = [3 + i % (loaded.config.vocab_size - 3) for i in range(context_tokens)]
    logits, cache = prefill(loaded.model, ids)
    token, times = int(logits.argmax()), []
    for _ in range(steps):
        started = time.perf_counter()
        token = int(decode_step(loaded.model, cache, token).argmax())
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def measure(loaded, lengths: list[int], *, prfaas_instances: int, pd_instances: int, egress_gbps: float,
            output_tokens: int, repeats: int = 3) -> Profile:
    if len(lengths) < 2 or sorted(set(lengths)) != lengths:
        raise ValueError(f"need at least two increasing prompt lengths, got {lengths}")
    with progress.step("warming up"):
        warm_up(loaded.model)
    points = prefill_points(loaded, lengths, repeats)
    with progress.step("timing decode steps"):
        step_s = decode_step_s(loaded, lengths[len(lengths) // 2])
    # This worker decodes one request per step (batch 1, requests interleaved).
    return parse_profile(_json({
        "prfaas": {"instances": prfaas_instances, "points": points},
        "pd_prefill": {"points": points},
        "pd_decode": {"batch_max": 1, "step_s": round(step_s, 6), "output_tokens": output_tokens},
        "pd_instances": pd_instances,
        "egress_gbps": egress_gbps,
    }))


def _json(obj) -> bytes:
    import json

    return json.dumps(obj).encode()
