"""perf ttft-wan: the serving prefill -> decode path across an emulated WAN link.

Prefill (this benchmark's serving.ttft_bench run) in namespace a, the KV receiver in
namespace b, joined by perf.wanlink: 40 ms RTT, 0.1% loss, at 100 Mbit/s and
1 Gbit/s. For each link and codec (none, fp8): monolithic prefill time, TTFT when each
layer is sent from a forward hook as it completes, and TTFT when the whole cache is sent
after the prefill, for the tiny Kimi-Linear model at 1K and 4K tokens.

    sudo python -m perf ttft-wan --json
    sudo python -m perf ttft-wan --quick --json     # 1K tokens, 1 Gbit/s only
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK_ARGS = ["--quick"]


def unavailable() -> str | None:
    from perf.wanlink import unavailable_reason

    return unavailable_reason()


def run(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", default="100,1000", help="link rates in Mbit/s")
    ap.add_argument("--codecs", default="none,fp8")
    ap.add_argument("--lengths", default="1024,4096")
    ap.add_argument("--rtt-ms", type=float, default=40.0)
    ap.add_argument("--loss", type=float, default=0.001)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.rates, args.codecs, args.lengths = "1000", "none", "1024"
    from perf.wanlink import LinkSpec, WanLink
    from serving.demo import tiny_model_dir

    model_dir = str(tiny_model_dir())
    runs = []
    for rate in (float(r) for r in args.rates.split(",")):
        spec = LinkSpec(rate_mbit=rate, rtt_ms=args.rtt_ms, loss=args.loss, mtu=9000)
        with WanLink(spec, congestion_control="bbr") as link:
            for codec in args.codecs.split(","):
                bench = [
                    sys.executable, "-m", "serving.ttft_bench", "--json", "--model", model_dir,
                    "--lengths", args.lengths, "--codec", codec, "--streams", "0",
                    "--receiver-netns", link.namespaces["b"], "--listen", f"{link.addr_b}:0",
                ]
                done = link.run("a", bench, timeout=900, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT})
                if done.returncode != 0:
                    raise RuntimeError(f"ttft_bench failed on {rate} Mbit/s, codec {codec}: {done.stderr[-1500:]}")
                result = json.loads(done.stdout)
                runs.append({
                    "link": {"rate_mbit": rate, "rtt_ms": args.rtt_ms, "loss": args.loss, "mtu": 9000, "cc": "bbr"},
                    "codec": codec,
                    "points": result["points"],
                })
    return {"benchmark": "ttft-wan", "model": "tiny Kimi-Linear (seeded)", "runs": runs}


def main(argv: list[str] | None = None) -> int:
    result = run(argv)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
