"""perf wan: kvwire's goodput across an emulated cross-datacenter link, next to iperf3.

The link (perf.wanlink): 1 Gbit/s, 40 ms RTT, 0.1% random loss each way, MTU 9000,
a one-BDP bottleneck buffer, TCP buffers up to 32 MiB. For each congestion control (bbr,
reno, set in both namespaces) and in one run over one link: kvwire's default
configuration (``Sender`` with no ``streams``), kvwire with 1, 2, 4, 8 and 16 streams,
kvwire with the streams ``kvwire.transport.tuning`` chooses for the declared link and the
measured RTT ("tuned"), and ``iperf3 -P 1`` and ``-P 8`` moving the same bytes.

kvwire runs as a Receiver process in namespace b and a Sender process per transfer in
namespace a. A transfer is timed from ``open`` to ``finish`` (the receiver has verified
every layer); connection setup is not timed, as for iperf3. Goodput: raw KV bytes x 8 /
seconds (1e6 bit/s = 1 Mbit/s). iperf3's figure is its receiver's ``sum_received``.

    sudo python -m perf wan --json               # 1 GiB per transfer (about 10 minutes)
    sudo python -m perf wan --quick --json       # 32 MiB per transfer
    python -m perf wan --pythonpath /tmp/kvwire-patched   # the Sender from another tree
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECRET = b"perf-wan"
PORT = 7800
IPERF_PORT = 5201
NUM_LAYERS = 32
TOKEN_SHAPE = (8, 128)  # float16: 2 KiB per token and layer
QUICK_ARGS = ["--quick"]


def unavailable() -> str | None:
    """Why this benchmark cannot run here (None: it can)."""
    from perf.wanlink import unavailable_reason

    return unavailable_reason()


def make_layout(num_bytes: int):
    from kvwire import KVLayout, TensorSpec

    per_token = NUM_LAYERS * TOKEN_SHAPE[0] * TOKEN_SHAPE[1] * 2
    layout = KVLayout([{"kv": TensorSpec(TOKEN_SHAPE, "float16", per_token=True)} for _ in range(NUM_LAYERS)])
    return layout, max(1, num_bytes // per_token)


# -- the two kvwire processes ------------------------------------------------------------------


def _tls_context(folder: str | None, *, server: bool):
    """TLS with the self-signed certificate in ``folder`` (cert.pem, key.pem); None: plaintext."""
    if not folder:
        return None
    import ssl

    if server:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(os.path.join(folder, "cert.pem"), os.path.join(folder, "key.pem"))
    else:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.load_verify_locations(os.path.join(folder, "cert.pem"))
    return context


def make_certificate(folder: str, ip: str) -> None:
    """A self-signed certificate for ``ip`` (the receiver's address on the link)."""
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", f"/CN={ip}",
         "-addext", f"subjectAltName=IP:{ip}", "-keyout", os.path.join(folder, "key.pem"),
         "-out", os.path.join(folder, "cert.pem")],
        check=True, capture_output=True,
    )


def run_receiver(args) -> None:
    import numpy as np

    from kvwire import KVWireError, Receiver

    layout, num_tokens = make_layout(args.bytes)
    destination = [{"kv": np.ones((num_tokens, *TOKEN_SHAPE), dtype=np.float16)} for _ in range(NUM_LAYERS)]
    rx = Receiver(
        layout, f"{args.host}:{args.port}", secret=SECRET, max_request_timeout_s=args.timeout_s,
        ssl_context=_tls_context(args.tls_dir, server=True),
    )
    print(json.dumps({"address": rx.address}), flush=True)
    for line in sys.stdin:
        command, _, rid = line.strip().partition(" ")
        if command != "expect":
            break
        rx.expect(rid, destination)
        print("ready", flush=True)
        try:
            got = rx.wait(rid, timeout=min(60.0, args.timeout_s))  # a sender that failed to start never opens it
            got.wait_done(timeout=args.timeout_s)
            got.release()
            print(json.dumps({"rid": rid, "ok": True}), flush=True)
        except KVWireError as exc:
            rx.release(rid)
            print(json.dumps({"rid": rid, "ok": False, "error": f"{type(exc).__name__}: {exc}"}), flush=True)
    rx.close()


def run_sender(args) -> None:
    import numpy as np

    from kvwire import Sender
    from kvwire.transport.tcp import TcpOptions

    layout, num_tokens = make_layout(args.bytes)
    block = np.arange(num_tokens * TOKEN_SHAPE[0] * TOKEN_SHAPE[1], dtype=np.uint16).view(np.float16)
    data = [{"kv": block.reshape(num_tokens, *TOKEN_SHAPE)} for _ in range(NUM_LAYERS)]
    kwargs, tuning = {}, None
    if args.sender_streams == "tuned":
        from kvwire.transport.tuning import HostLimits, LinkEstimate, choose

        link = LinkEstimate(
            rtt_s=args.rtt_ms / 1000, bandwidth_bps=args.rate_mbit * 1e6, loss=args.loss, mss_bytes=args.mtu - 52
        )
        tuning = choose(link, HostLimits.read())
        kwargs = {
            "streams": tuning.num_streams,
            "transport_options": TcpOptions(
                buffer_bytes=tuning.buffer_bytes, congestion_control=tuning.congestion_control
            ),
        }
    elif args.sender_streams != "default":
        kwargs = {"streams": int(args.sender_streams)}
    tls = _tls_context(args.tls_dir, server=False)
    with Sender(layout, args.address, secret=SECRET, timeout=30, ssl_context=tls, **kwargs) as tx:
        t0 = time.perf_counter()
        xfer = tx.open(args.rid, num_tokens, timeout=args.timeout_s)
        for i, tensors in enumerate(data):
            xfer.send_layer(i, tensors)
        stats = xfer.finish(timeout=args.timeout_s)
        seconds = time.perf_counter() - t0
        links = tx.metrics().links
        result = {
            "seconds": seconds,
            "raw_bytes": stats.raw_bytes,
            "num_streams": tx.num_streams,
            "retransmits": sum(link.total_retrans for link in links),
            "min_rtt_ms": min((link.min_rtt_ms for link in links), default=None),
        }
    if tuning is not None:
        result["tuning"] = tuning.reason
    print(json.dumps(result), flush=True)


# -- the orchestrator (root namespace) ------------------------------------------------------------


def _kvwire_transfer(link, receiver, args, streams: str, rid: str, rtt_ms: float) -> dict:
    receiver.stdin.write(f"expect {rid}\n")
    receiver.stdin.flush()
    if receiver.stdout.readline().strip() != "ready":
        raise RuntimeError("kvwire receiver process died")
    env = dict(os.environ, PYTHONPATH=args.pythonpath)
    argv = [
        sys.executable,
        "-m",
        "perf.wan",
        "--role",
        "sender",
        "--address",
        f"{link.addr_b}:{args.port}",
        "--bytes",
        str(args.bytes),
        "--sender-streams",
        streams,
        "--rid",
        rid,
        "--timeout-s",
        str(args.timeout_s),
        "--rate-mbit",
        str(link.spec.rate_mbit),
        "--loss",
        str(link.spec.loss),
        "--mtu",
        str(link.spec.mtu),
        "--rtt-ms",
        str(rtt_ms),
        *(["--tls-dir", args.tls_dir] if args.tls_dir else []),
    ]
    cpu0, t0 = link.relay_cpu_seconds(), time.monotonic()
    try:
        done = link.run("a", argv, env=env, cwd=ROOT, timeout=args.timeout_s + 60)
    except subprocess.TimeoutExpired:
        done = None
    wall = time.monotonic() - t0
    cpu = (link.relay_cpu_seconds() - cpu0) / wall
    verdict = json.loads(receiver.stdout.readline())  # the receiver gives up by the same deadline
    if done is None or done.returncode != 0 or not verdict["ok"]:
        error = verdict.get("error") or (done.stderr.strip().splitlines()[-1:] if done else "timed out")
        return {"mbit": None, "error": str(error)}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["mbit"] = round(result["raw_bytes"] * 8 / result["seconds"] / 1e6, 1)
    result["relay_cpu_cores"] = round(cpu, 3)
    return result


def _iperf3(link, args, parallel: int) -> dict:
    argv = [
        "iperf3",
        "-c",
        link.addr_b,
        "-p",
        str(IPERF_PORT),
        "-P",
        str(parallel),
        "-n",
        str(args.bytes),
        "-J",
        "--connect-timeout",
        "5000",
    ]
    cpu0, t0 = link.relay_cpu_seconds(), time.monotonic()
    try:
        done = link.run("a", argv, timeout=args.timeout_s + 60)
    except subprocess.TimeoutExpired:
        return {"mbit": None, "error": "timed out"}
    cpu = (link.relay_cpu_seconds() - cpu0) / (time.monotonic() - t0)
    try:
        end = json.loads(done.stdout)["end"]
        received = end["sum_received"]
    except (ValueError, KeyError):
        return {"mbit": None, "error": (done.stdout + done.stderr).strip()[-300:]}
    return {
        "mbit": round(received["bits_per_second"] / 1e6, 1),
        "bytes": received["bytes"],
        "seconds": received["seconds"],
        "retransmits": end["sum_sent"].get("retransmits"),
        "relay_cpu_cores": round(cpu, 3),
    }


def run_link(spec, cc: str, args) -> dict:
    from perf.wanlink import WanLink, measure

    label = "smoke (32 MiB, not comparable): " if args.quick else ""
    log = (lambda *a: None) if args.json else (lambda line: print(label + line, file=sys.stderr, flush=True))
    with WanLink(spec, congestion_control=cc) as link:
        rtt_ms = measure(link, connects=5)["rtt_ms"]
        log(f"[{cc}] link up, RTT {rtt_ms:.1f} ms")
        env = dict(os.environ, PYTHONPATH=args.pythonpath)
        receiver = link.popen(
            "b",
            [
                sys.executable,
                "-m",
                "perf.wan",
                "--role",
                "receiver",
                "--host",
                link.addr_b,
                "--bytes",
                str(args.bytes),
                "--timeout-s",
                str(args.timeout_s),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            cwd=ROOT,
        )
        json.loads(receiver.stdout.readline())
        kvwire, details = {}, {}
        for i, streams in enumerate([*map(str, args.streams), "default", "tuned"]):
            details[streams] = _kvwire_transfer(link, receiver, args, streams, f"{cc}-{i}", rtt_ms)
            kvwire[streams] = details[streams]["mbit"]
            log(f"[{cc}] kvwire {streams:>7}: {kvwire[streams]} Mbit/s")
        receiver.stdin.write("quit\n")
        receiver.stdin.flush()
        iperf, iperf_details = {}, {}
        if shutil.which("iperf3"):
            link.popen(
                "b",
                ["iperf3", "-s", "-B", link.addr_b, "-p", str(IPERF_PORT)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            time.sleep(0.5)
            for parallel in args.iperf3_parallel:
                iperf_details[str(parallel)] = _iperf3(link, args, parallel)
                iperf[str(parallel)] = iperf_details[str(parallel)]["mbit"]
                log(f"[{cc}] iperf3 -P {parallel}: {iperf[str(parallel)]} Mbit/s")
        else:
            iperf = {str(p): None for p in args.iperf3_parallel}
            iperf_details = {"error": "iperf3 is not installed (apt-get install iperf3)"}
    return {
        "cc": cc,
        "link": {"rate_mbit": spec.rate_mbit, "rtt_ms": spec.rtt_ms, "loss": spec.loss, "mtu": spec.mtu},
        "kvwire_mbit": kvwire,
        "iperf3_mbit": iperf,
        "rtt_measured_ms": round(rtt_ms, 2),
        "default_streams": details["default"].get("num_streams"),
        "tuned": details["tuned"].get("tuning"),
        "targets": _targets(kvwire.get("default"), iperf, cc),
        "kvwire_details": details,
        "iperf3_details": iperf_details,
    }


def _targets(default: float | None, iperf: dict, cc: str) -> dict:
    out = {}
    if default is not None and iperf.get("8"):
        out["default_vs_iperf3_P8"] = round(default / iperf["8"], 3)
        out["met_0.95x_P8"] = default >= 0.95 * iperf["8"]
    if cc == "reno" and default is not None and iperf.get("1"):
        out["default_vs_iperf3_P1"] = round(default / iperf["1"], 3)
        out["met_3x_P1"] = default >= 3 * iperf["1"]
    return out


def run(argv: list[str] | None = None) -> dict:
    """Run the benchmark; returns its JSON-ready result."""
    from perf.wanlink import LinkSpec, WanError

    args = parse(argv)
    spec = LinkSpec(rate_mbit=args.rate_mbit, rtt_ms=args.rtt_ms, loss=args.loss, mtu=args.mtu)
    from perf.plots import machine_info

    reason = unavailable()
    if reason is not None:
        raise WanError(f"perf wan needs a WAN link: {reason}")
    t0 = time.monotonic()
    runs = [run_link(spec, cc, args) for cc in args.cc]
    if args.quick:  # each figure says what it is, wherever it is copied to
        runs = [{"smoke": True, **run} for run in runs]
    return {
        "benchmark": "wan",
        "bytes_per_transfer": args.bytes,
        "units": "Mbit/s (1e6 bit/s) of goodput",
        "default_note": "default = Sender() with no streams argument, whatever the kvwire tree at PYTHONPATH does "
        "(streams=4 until the tuning hook is applied); tuned = streams from kvwire.transport.tuning",
        "pythonpath": args.pythonpath,
        "runs": runs,
        "seconds": round(time.monotonic() - t0, 1),
        "machine": machine_info(),
    }


def parse(argv):
    ap = argparse.ArgumentParser(
        prog="python -m perf wan", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--gib", type=float, default=1.0, help="GiB per transfer")
    ap.add_argument("--quick", action="store_true", help="CI smoke: 32 MiB per transfer")
    ap.add_argument("--cc", type=lambda s: s.split(","), default=["bbr", "reno"])
    ap.add_argument(
        "--streams",
        type=lambda s: [int(x) for x in s.split(",") if x],
        default=[1, 2, 4, 8, 16],
        help="kvwire stream counts to measure besides default and tuned ('' for none)",
    )
    ap.add_argument("--iperf3-parallel", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8])
    ap.add_argument("--rate-mbit", type=float, default=1000.0)
    ap.add_argument("--rtt-ms", type=float, default=40.0)
    ap.add_argument("--loss", type=float, default=0.001)
    ap.add_argument("--mtu", type=int, default=9000)
    ap.add_argument("--pythonpath", default=ROOT, help="kvwire tree the Sender processes import")
    ap.add_argument("--json", action="store_true")
    ap.add_argument(
        "--role", choices=["orchestrator", "receiver", "sender"], default="orchestrator", help=argparse.SUPPRESS
    )
    for flag in ("--host", "--address", "--rid", "--sender-streams"):
        ap.add_argument(flag, help=argparse.SUPPRESS)
    ap.add_argument("--bytes", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=PORT, help=argparse.SUPPRESS)
    ap.add_argument("--tls-dir", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--timeout-s", type=float, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.bytes is None:
        args.bytes = int((1 / 32 if args.quick else args.gib) * 2**30)
    if args.timeout_s is None:  # a generous bound: the whole transfer at 20 Mbit/s
        args.timeout_s = max(60.0, args.bytes * 8 / 20e6)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.role == "receiver":
        return run_receiver(args)
    if args.role == "sender":
        return run_sender(args)
    print(json.dumps(run(argv), indent=None if args.json else 2))


if __name__ == "__main__":
    main()


def tls_comparison(argv: list[str] | None = None) -> dict:
    """kvwire's default configuration with and without TLS over the same emulated link."""
    import tempfile

    from perf.wanlink import LinkSpec, WanLink, measure

    args = parse(argv)
    spec = LinkSpec(rate_mbit=args.rate_mbit, rtt_ms=args.rtt_ms, loss=args.loss, mtu=args.mtu)
    out = {"link": {"rate_mbit": spec.rate_mbit, "rtt_ms": spec.rtt_ms, "loss": spec.loss, "mtu": spec.mtu}, "runs": {}}
    with tempfile.TemporaryDirectory() as folder, WanLink(spec, congestion_control=args.cc[0]) as link:
        make_certificate(folder, link.addr_b)
        rtt_ms = measure(link, connects=5)["rtt_ms"]
        for name, tls_dir, port in (("plaintext", None, PORT), ("tls", folder, PORT + 1)):
            args.tls_dir, args.port = tls_dir, port
            env = dict(os.environ, PYTHONPATH=args.pythonpath)
            receiver = link.popen(
                "b",
                [sys.executable, "-m", "perf.wan", "--role", "receiver", "--host", link.addr_b, "--port", str(port),
                 "--bytes", str(args.bytes), "--timeout-s", str(args.timeout_s),
                 *(["--tls-dir", tls_dir] if tls_dir else [])],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT,
            )
            json.loads(receiver.stdout.readline())
            runs = [_kvwire_transfer(link, receiver, args, "default", f"{name}-{i}", rtt_ms) for i in range(3)]
            receiver.stdin.write("quit\n")
            receiver.stdin.flush()
            out["runs"][name] = {"mbit": [r["mbit"] for r in runs], "best_mbit": max((r["mbit"] or 0) for r in runs)}
    out["cc"] = args.cc[0]
    out["tls_vs_plaintext"] = round(out["runs"]["tls"]["best_mbit"] / out["runs"]["plaintext"]["best_mbit"], 3)
    return out
