"""perf senders: many prefill hosts into one decode receiver, against one sender alone.

    python -m perf senders --json                 # 8 senders x 64 MiB over loopback
    sudo python -m perf senders --wan --json      # the same over the emulated WAN link

One Receiver process; each sender is its own process with its own Sender (its own
connections, its own session), as separate prefill hosts are. Every sender connects
first, then all start at one instant (CLOCK_MONOTONIC, shared by every process on a host
and its namespaces) and send ``--requests`` requests of ``--mib`` / ``--requests`` MiB
each, one at a time, each timed until ``finish()`` (the receiver verified it). Measured:

- aggregate goodput: every sender's bytes over the span from the first start to the last
  finish, against one sender alone moving one sender's bytes, and against the same
  number of raw TCP sockets (one process each, ``sendall`` + a one-byte ack per request)
  moving the same bytes in the same run: this machine's own limit for that many flows;
- Jain's fairness index over the senders' goodputs (1.0: equal shares);
- over ``--wan``: every sender shares the one emulated link (1 Gbit/s, 40 ms RTT, 0.1% loss
  each way, perf.wanlink), i.e. one bottleneck, as prefill hosts of one cluster
  reaching a decode cluster elsewhere over one WAN path.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIB = 1 << 20
QUICK_ARGS = ["--senders", "3", "--mib", "8"]
SECRET = b"perf-senders"
TOKEN_BYTES = 4096  # one layer of one per-token tensor: 4 KiB a token


def layout():
    from kvwire import KVLayout, TensorSpec

    return KVLayout([{"kv": TensorSpec((TOKEN_BYTES,), "uint8", per_token=True)}])


# -- child processes ---------------------------------------------------------------------------


def receiver_main(args) -> None:
    """kvwire: take every request of every sender, release it once complete. raw: one
    accepted socket per sender, each request's bytes then a one-byte ack."""
    import threading

    from kvwire import Receiver

    rx = Receiver(layout(), f"{args.host}:0", secret=SECRET, max_bytes=8 << 30)
    raw = socket.create_server((args.host, 0))
    print(json.dumps({"kvwire": rx.address, "raw": raw.getsockname()[1]}), flush=True)
    size = args.mib * MIB // args.requests

    def serve_raw(conn: socket.socket) -> None:
        buf = memoryview(bytearray(size))
        with conn:
            while True:
                view = buf
                while len(view):
                    n = conn.recv_into(view, len(view), socket.MSG_WAITALL)
                    if not n:
                        return
                    view = view[n:]
                conn.sendall(b"k")

    def accept_raw() -> None:
        while True:
            conn, _ = raw.accept()
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=serve_raw, args=(conn,), daemon=True).start()

    threading.Thread(target=accept_raw, daemon=True).start()
    for line in sys.stdin:  # "take TAG SENDERS": every request of that case
        _, tag, senders = line.split()
        for s in range(int(senders)):
            for r in range(args.requests):
                with rx.wait(f"{tag}-{s}-{r}", timeout=600) as got:
                    got.wait_done(timeout=600)
        print(json.dumps({"taken": tag}), flush=True)


def sender_main(args) -> None:
    import numpy as np

    size = args.mib * MIB // args.requests
    payload = np.random.default_rng(args.index).integers(0, 256, size, dtype=np.uint8)
    if args.raw:
        sock = socket.create_connection((args.host, args.port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        send = lambda r: (sock.sendall(payload), sock.recv(1))
    else:
        from kvwire import Sender

        tx = Sender(layout(), args.address, secret=SECRET, timeout=30)

        def send(r):
            xfer = tx.open(f"{args.tag}-{args.index}-{r}", size // TOKEN_BYTES, timeout=600)
            xfer.send_layer(0, {"kv": payload.reshape(-1, TOKEN_BYTES)})
            xfer.finish()

    time.sleep(max(0.0, args.start_at - time.monotonic()))
    start = time.monotonic()
    for r in range(args.requests):
        send(r)
    print(json.dumps({"start": start, "end": time.monotonic(), "bytes": size * args.requests}), flush=True)


# -- the orchestrator ----------------------------------------------------------------------------


class Local:
    """Processes on this host, over loopback."""

    host = "127.0.0.1"

    def popen(self, side, argv, **kwargs):
        return subprocess.Popen(argv, **kwargs)


def run_case(place, receiver, ports, args, tag: str, senders: int, raw: bool) -> dict:
    if not raw:
        receiver.stdin.write(f"take {tag} {senders}\n")
        receiver.stdin.flush()
    start_at = time.monotonic() + 3.0 + 0.3 * senders  # every sender connected by then
    procs = []
    for index in range(senders):
        argv = [sys.executable, "-m", "perf.senders", "--role", "sender", "--index", str(index), "--tag", tag,
                "--mib", str(args.mib), "--requests", str(args.requests), "--start-at", repr(start_at),
                "--host", place.host, "--port", str(ports["raw"]), "--address", ports["kvwire"],
                *(["--raw"] if raw else [])]
        procs.append(place.popen("a", argv, stdout=subprocess.PIPE, text=True, cwd=ROOT,
                                 env=dict(os.environ, PYTHONPATH=ROOT)))
    results = []
    for proc in procs:
        out, _ = proc.communicate(timeout=900)
        if proc.returncode != 0:
            raise RuntimeError(f"a sender of case {tag} failed (exit {proc.returncode})")
        results.append(json.loads(out.strip().splitlines()[-1]))
    if not raw:
        json.loads(receiver.stdout.readline())
    goodputs = [r["bytes"] / (r["end"] - r["start"]) for r in results]
    span = max(r["end"] for r in results) - min(r["start"] for r in results)
    total = sum(r["bytes"] for r in results)
    return {
        "senders": senders,
        "aggregate_gbps": round(total / span / 1e9, 3),
        "per_sender_gbps": [round(g / 1e9, 3) for g in goodputs],
        "jain_fairness": round(sum(goodputs) ** 2 / (len(goodputs) * sum(g * g for g in goodputs)), 4),
        "seconds": round(span, 3),
    }


def run(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--senders", type=int, default=8)
    ap.add_argument("--mib", type=int, default=64, help="MiB each sender moves")
    ap.add_argument("--requests", type=int, default=4, help="requests each sender's MiB are cut into")
    ap.add_argument("--wan", action="store_true", help="over the emulated WAN link (root)")
    ap.add_argument("--quick", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--role", choices=["receiver", "sender"], help=argparse.SUPPRESS)
    for name in ("--tag", "--address", "--host"):
        ap.add_argument(name, default="127.0.0.1" if name == "--host" else "", help=argparse.SUPPRESS)
    for name in ("--index", "--port"):
        ap.add_argument(name, type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--start-at", type=float, default=0.0, help=argparse.SUPPRESS)
    ap.add_argument("--raw", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.role == "receiver":
        receiver_main(args)
        return {}
    if args.role == "sender":
        sender_main(args)
        return {}
    if args.wan:
        from perf.wanlink import LinkSpec, WanLink, unavailable_reason

        reason = unavailable_reason()
        if reason:
            raise SystemExit(f"--wan: {reason}")
        spec = LinkSpec(rate_mbit=1000, rtt_ms=40, loss=0.001)
        with WanLink(spec, congestion_control="bbr") as link:
            link.host = link.addr_b
            result = measure(link, args)
        result["link"] = {"rate_mbit": spec.rate_mbit, "rtt_ms": spec.rtt_ms, "loss": spec.loss,
                          "congestion_control": "bbr", "bottleneck": "one link shared by every sender"}
        return result
    return measure(Local(), args)


def measure(place, args) -> dict:
    receiver = place.popen("b", [sys.executable, "-m", "perf.senders", "--role", "receiver", "--host", place.host,
                                 "--mib", str(args.mib), "--requests", str(args.requests)],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT,
                           env=dict(os.environ, PYTHONPATH=ROOT))
    try:
        ports = json.loads(receiver.stdout.readline())
        cases = {}
        for name, senders, raw in (("kvwire_alone", 1, False), ("raw_alone", 1, True),
                                   ("kvwire", args.senders, False), ("raw", args.senders, True)):
            cases[name] = run_case(place, receiver, ports, args, name, senders, raw)
    finally:
        receiver.stdin.close()
        receiver.wait(timeout=30)
    return {
        "benchmark": "senders",
        "units": "GB/s (1e9 B/s) of request bytes",
        "mib_per_sender": args.mib,
        "requests_per_sender": args.requests,
        "results": cases,
        "kvwire_many_over_alone": round(cases["kvwire"]["aggregate_gbps"] / cases["kvwire_alone"]["aggregate_gbps"], 3),
        "raw_many_over_alone": round(cases["raw"]["aggregate_gbps"] / cases["raw_alone"]["aggregate_gbps"], 3),
        "kvwire_over_raw_many": round(cases["kvwire"]["aggregate_gbps"] / cases["raw"]["aggregate_gbps"], 3),
        "cpus": os.cpu_count(),
        "load_average": list(os.getloadavg()),
    }


def plot(result: dict, path: str) -> None:
    """Aggregate goodput of each case, and each sender's share."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = result["results"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.bar(list(cases), [c["aggregate_gbps"] for c in cases.values()])
    left.set(ylabel="aggregate GB/s", title=f"{result['mib_per_sender']} MiB per sender")
    for name in ("kvwire", "raw"):
        shares = cases[name]["per_sender_gbps"]
        right.plot(range(len(shares)), shares, "o-", label=f"{name} (Jain {cases[name]['jain_fairness']})")
    right.set(xlabel="sender", ylabel="GB/s", title="each sender's goodput")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    result = run(argv)
    if result:
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
