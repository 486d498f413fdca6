"""Load: many concurrent requests through the router to 2 prefill + 2 decode workers.

All processes on this machine, the tiny seeded Kimi-Linear model on the CPU. Every
answer's tokens are checked against a monolithic generate() of the same prompt; reports
throughput and latency percentiles (seconds, whole request).

    python -m perf.load --requests 200 --json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

QUICK_ARGS = ["--requests", "20"]


def run(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--distinct-prompts", type=int, default=20)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    import numpy as np

    from serving import client, launch
    from serving.demo import stop, tiny_model_dir
    from serving.model import load
    from serving.steps import generate_monolithic

    model_dir = tiny_model_dir()
    rng = np.random.default_rng(3)
    prompts = [rng.integers(3, 512, int(rng.integers(16, 256))).tolist() for _ in range(args.distinct_prompts)]
    model = load(model_dir).model
    expected = [generate_monolithic(model, p, args.max_tokens) for p in prompts]
    with tempfile.TemporaryDirectory() as tmp:
        secret = Path(tmp) / "secret"
        secret.write_text(os.urandom(16).hex())
        common = ["--model", str(model_dir), "--port", "0", "--secret-file", str(secret)]
        workers = []
        try:
            for _ in range(2):
                workers.append(launch.start("decode", [*common, "--kv-listen", "127.0.0.1:0"]))
                workers.append(launch.start("prefill", common))
            decodes = [w.url for w in workers if w.role == "decode"]
            prefills = [w.url for w in workers if w.role == "prefill"]
            router_args = [a for url in prefills for a in ("--prefill", url)] + [a for url in decodes for a in ("--decode", url)]
            workers.append(launch.start("router", [*router_args, "--port", "0"]))
            front = workers[-1].url
            latencies: list[float | None] = [None] * args.requests
            correct = [False] * args.requests
            sources: list[str | None] = [None] * args.requests

            def ask(i: int) -> None:
                k = i % len(prompts)
                body = {"prompt": prompts[k], "max_tokens": args.max_tokens, "return_token_ids": True}
                started = time.perf_counter()
                result = client.complete(front, body, timeout_s=600)
                latencies[i] = time.perf_counter() - started
                correct[i] = result.status == 200 and result.token_ids == expected[k]
                if result.status == 200:
                    sources[i] = (result.body.get("kvwire") or {}).get("kv_source")
                else:
                    error = result.body.get("error") or {}
                    sources[i] = f"{result.status} {error.get('type')}: {str(error.get('message'))[:160]}"

            wall = client.burst(ask, args.requests, timeout_s=900)
        finally:
            stop(workers)
    done = sorted(x for x in latencies if x is not None)
    return {
        "benchmark": "load",
        "requests": args.requests,
        "completed": len(done),
        "correct_tokens": sum(correct),
        "kv_sources": {s: sources.count(s) for s in set(sources)},
        "wall_s": round(wall, 2),
        "throughput_req_s": round(len(done) / wall, 2),
        "tokens_per_s": round(len(done) * args.max_tokens / wall, 1),
        "latency_p50_s": round(float(np.percentile(done, 50)), 3) if done else None,
        "latency_p99_s": round(float(np.percentile(done, 99)), 3) if done else None,
        "workers": "2 prefill + 2 decode + router, tiny Kimi-Linear, CPU",
    }


def main(argv: list[str] | None = None) -> int:
    result = run(argv)
    print(json.dumps(result))
    return 0 if result["correct_tokens"] == result["requests"] else 1


if __name__ == "__main__":
    sys.exit(main())
