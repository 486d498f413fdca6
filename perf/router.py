"""perf router: PrfaaS routing vs all-local vs offload-everything, over an emulated WAN.

Processes (tiny seeded Kimi-Linear, CPU, one torch thread each), joined by
perf.wanlink (root):

    namespace a  "PrfaaS cluster":   prefill worker P  --- WAN link (rate, RTT) ---+
    namespace b  "local PD cluster": prefill worker L, decode worker D, router, client

Each policy is a router over the same workers: ``prfaas`` (incremental length > t goes to
P, the rest to L, with the bandwidth-aware threshold controller on), ``all-local``
(everything on L) and ``offload-all`` (everything on P; t = 0). The client fires a burst
of requests with log-normal prompt lengths (the same prompts for every policy), checks
every token against a monolithic generate(), and reports throughput and P50/P90 TTFT
(the router's: request in to first token out, prefill and KV transfer included).

    sudo python -m perf router --json
    sudo python -m perf router --quick --json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK_ARGS = ["--requests", "12", "--max-len", "2048"]
POLICIES = ("prfaas", "all-local", "offload-all")


def unavailable() -> str | None:
    from perf.wanlink import unavailable_reason

    return unavailable_reason()


def arguments(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--median-len", type=int, default=600, help="median prompt length (log-normal)")
    ap.add_argument("--sigma", type=float, default=1.0, help="log-normal sigma of prompt lengths")
    ap.add_argument("--min-len", type=int, default=32)
    ap.add_argument("--max-len", type=int, default=4096)
    ap.add_argument("--threshold", default="plan",
                    help="the prfaas policy's offload threshold t in tokens, or 'plan': kvwire-plan's t for a profile "
                         "measured here (kvwire-serve profile) and this workload")
    ap.add_argument("--max-tokens", type=int, default=4, help="few: the burst should load prefill, not decode")
    ap.add_argument("--rate-mbit", type=float, default=100.0)
    ap.add_argument("--rtt-ms", type=float, default=40.0)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--client", metavar="SPEC", help=argparse.SUPPRESS)  # internal: run the burst (in namespace b)
    return ap.parse_args(argv)


def prompt_lengths(args) -> list[int]:
    """Truncated log-normal lengths (redrawn outside [min, max]), seeded."""
    import numpy as np

    rng = np.random.default_rng(11)
    out: list[int] = []
    while len(out) < args.requests:
        n = round(rng.lognormal(np.log(args.median_len), args.sigma))
        if args.min_len <= n <= args.max_len:
            out.append(n)
    return out


# -- the client (runs in namespace b, next to the routers) ----------------------------------


def burst(spec: dict) -> dict:
    """Fire every prompt at once at each router in turn; tokens checked, TTFTs collected."""
    import numpy as np

    from serving import client

    prompts, expected = spec["prompts"], spec["expected"]
    results = {}
    for policy, url in spec["routers"].items():
        rows: list[dict | None] = [None] * len(prompts)

        def ask(i: int, url: str = url, rows: list = rows) -> None:
            answer = client.complete(url, {"prompt": prompts[i], "max_tokens": spec["max_tokens"], "return_token_ids": True},
                                     timeout_s=900)
            kv = answer.body.get("kvwire") or {}
            rows[i] = {"ok": answer.status == 200 and answer.token_ids == expected[i], "ttft_s": kv.get("ttft_s"),
                       "pool": (kv.get("route") or {}).get("prefill_pool"), "kv_source": kv.get("kv_source")}

        for warm in (prompts[0], max(prompts, key=len)):  # first requests pay for lazy setup: not in the burst
            client.complete(url, {"prompt": warm, "max_tokens": 1}, timeout_s=900)
        wall = client.burst(ask, len(prompts))
        health = json.loads(client.get(url, "/health")[1])
        ttfts = [r["ttft_s"] for r in rows if r and r["ttft_s"] is not None]
        pools = [r["pool"] for r in rows if r]
        results[policy] = {
            "completed": sum(r is not None for r in rows), "correct_tokens": sum(bool(r and r["ok"]) for r in rows),
            "recomputed": sum(bool(r and r["kv_source"] == "recomputed") for r in rows),
            "wall_s": round(wall, 3), "throughput_req_s": round(sum(bool(r and r["ok"]) for r in rows) / wall, 3),
            "prompt_tokens_per_s": round(sum(map(len, prompts)) / wall, 1),
            "ttft_p50_s": round(float(np.percentile(ttfts, 50)), 3) if ttfts else None,
            "ttft_p90_s": round(float(np.percentile(ttfts, 90)), 3) if ttfts else None,
            "routed": {p: pools.count(p) for p in sorted(set(map(str, pools)))},
            "threshold_changes": [change["reason"] for cluster in health["thresholds"].values()
                                  for change in cluster["changes"]],
        }
        time.sleep(1.0)  # let the link drain between policies
    return results


# -- the orchestrator ------------------------------------------------------------------------


def plan_threshold(loaded, args) -> dict:
    """kvwire-plan on this machine's measured profile (one torch thread, as the workers) and the workload."""
    import math

    import torch

    from serving.planner import parse_workload, search
    from serving.profile import measure

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        profile = measure(loaded, [128, 512, 2048], prfaas_instances=1, pd_instances=2,
                          egress_gbps=args.rate_mbit / 1000, output_tokens=args.max_tokens, repeats=2)
    finally:
        torch.set_num_threads(threads)
    workload = parse_workload(f"lognormal:mu={math.log(args.median_len)},sigma={args.sigma},"
                              f"min={args.min_len},max={args.max_len}")
    out = search(profile, workload).to_dict()
    return {key: out[key] for key in ("t", "p", "l_long", "l_short", "lambda_max", "n_p", "n_d", "egress_gbps_needed")}


def run(argv: list[str] | None = None) -> dict:
    args = arguments(argv)
    if args.client:
        return burst(json.loads(Path(args.client).read_text()))
    from perf.wanlink import LinkSpec, WanLink
    from serving import launch
    from serving.demo import prompts as make_prompts
    from serving.demo import stop, tiny_model_dir
    from serving.model import load
    from serving.steps import generate_monolithic

    model_dir = tiny_model_dir()
    lengths = prompt_lengths(args)
    prompts = [make_prompts([n], 512, seed=100 + i)[0] for i, n in enumerate(lengths)]
    loaded = load(model_dir)
    expected = [generate_monolithic(loaded.model, p, args.max_tokens) for p in prompts]
    planned = plan_threshold(loaded, args) if args.threshold == "plan" else None
    threshold = int(planned["t"]) if planned else int(args.threshold)
    env = {"OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    spec = LinkSpec(rate_mbit=args.rate_mbit, rtt_ms=args.rtt_ms, mtu=9000)
    with tempfile.TemporaryDirectory() as tmp, WanLink(spec, congestion_control="bbr") as link:
        secret = Path(tmp) / "secret"
        secret.write_text(os.urandom(16).hex())
        common = ["--model", str(model_dir), "--port", "0", "--secret-file", str(secret)]
        workers = []
        try:
            in_a, in_b = link.command("a", []), link.command("b", [])
            workers.append(launch.start("decode", [*common, "--host", link.addr_b, "--kv-listen", f"{link.addr_b}:0"],
                                        env=env, wrapper=in_b))
            workers.append(launch.start("prefill", [*common, "--host", link.addr_b], env=env, wrapper=in_b))
            workers.append(launch.start("prefill", [*common, "--host", link.addr_a], env=env, wrapper=in_a))
            decode, local, remote = (w.url for w in workers)
            capacity = ["--egress-gbps", str(args.rate_mbit / 1000), "--control-interval", "0.25"]
            configs = {
                "prfaas": ["--prefill", local, "--prfaas", remote, "--prfaas-threshold", str(threshold), *capacity],
                "all-local": ["--prefill", local],
                "offload-all": ["--prfaas", remote, "--prfaas-threshold", "0", "--prfaas-max-threshold", "0", *capacity],
            }
            routers = {}
            for policy in POLICIES:
                router = launch.start("router", [*configs[policy], "--decode", decode, "--host", link.addr_b, "--port", "0"],
                                      env=env, wrapper=in_b)
                workers.append(router)
                routers[policy] = router.url
            spec_path = Path(tmp) / "burst.json"
            spec_path.write_text(json.dumps({"prompts": prompts, "expected": expected, "routers": routers,
                                             "max_tokens": args.max_tokens}))
            done = link.run("b", [sys.executable, "-m", "perf.router", "--client", str(spec_path)], timeout=3600,
                            env={**os.environ, **env})
            if done.returncode != 0:
                raise RuntimeError(f"burst client failed: {done.stderr[-2000:]}")
            results = json.loads(done.stdout.strip().splitlines()[-1])
        finally:
            stop(workers)
    base = results["all-local"]
    for policy in POLICIES:
        results[policy]["throughput_vs_all_local"] = round(results[policy]["throughput_req_s"] / base["throughput_req_s"], 3)
    return {
        "benchmark": "router",
        "link": {"rate_mbit": args.rate_mbit, "rtt_ms": args.rtt_ms, "mtu": 9000, "cc": "bbr"},
        "workload": {"requests": args.requests, "lognormal_median": args.median_len, "sigma": args.sigma,
                     "min": args.min_len, "max": args.max_len, "mean_len": round(sum(lengths) / len(lengths), 1),
                     "max_tokens": args.max_tokens, "threshold_tokens": threshold},
        "plan": planned,
        "policies": results,
        "workers": "prefill P in namespace a (PrfaaS); prefill L, decode D, routers, client in namespace b; "
                   "tiny Kimi-Linear, CPU, 1 torch thread each",
    }


def main(argv: list[str] | None = None) -> int:
    result = run(argv)
    print(json.dumps(result))
    if "policies" not in result:
        return 0
    ok = all(p["correct_tokens"] == result["workload"]["requests"] for p in result["policies"].values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
