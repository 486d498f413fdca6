"""Coverage-guided fuzzing (atheris) of everything that parses bytes from the network.

Targets:
- decoders: the stream and handshake message decoders (must raise only ProtocolError).
- handshake: a receiver's handshake fed arbitrary bytes (only kvwire errors, no accept).
- receiver: arbitrary bytes after a *valid* authenticated handshake, into a live
  Receiver; afterwards a real transfer must still succeed (it keeps serving).

    python -m perf.fuzz --target all --runs 20000 --json

Each target runs in its own process (libFuzzer owns the process); a crash or an
unexpected exception ends it with a non-zero status and the offending input saved.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time

TARGETS = ("decoders", "handshake", "receiver")


def _worker(target: str, libfuzzer_args: list[str]) -> None:
    import atheris

    with atheris.instrument_imports():
        from kvwire import KVLayout, KVWireError, Receiver, Sender, TensorSpec
        from kvwire.errors import ProtocolError
        from kvwire.transport.tcp import TcpConnection
        from kvwire.wire import framing
        from kvwire.wire.handshake import client_handshake, server_handshake
        from kvwire.wire.messages import Welcome

    import ml_dtypes
    import numpy as np

    layout = KVLayout([{"s": TensorSpec((4, 4), "float32")}, {"k": TensorSpec((2, 8), "bfloat16", per_token=True)}])

    def decoders(data: bytes) -> None:
        for decode in (framing.decode_stream, framing.decode_handshake):
            try:
                decode(data)
            except ProtocolError:
                pass

    def handshake(data: bytes) -> None:
        a, b = socket.socketpair()
        try:
            a.sendall(data)
            a.shutdown(socket.SHUT_WR)
            conn = TcpConnection(b, "fuzz")
            conn.set_timeout(1)
            try:
                server_handshake(conn, layout=layout, secret=b"k", welcome=lambda hello: Welcome(1))
            except KVWireError:
                return
            raise AssertionError("handshake accepted bytes that never proved the secret")
        finally:
            a.close()
            b.close()

    rx = Receiver(layout, secret=b"k") if target == "receiver" else None
    count = [0]

    def receiver(data: bytes) -> None:
        host, port = rx.address.rsplit(":", 1)
        sock = socket.create_connection((host, int(port)))
        conn = TcpConnection(sock, rx.address)
        conn.set_timeout(5)
        client_handshake(conn, layout=layout, secret=b"k", session_id=os.urandom(16), stream_index=0, num_streams=1)
        try:
            sock.sendall(data)
        except OSError:
            pass
        conn.close()
        count[0] += 1
        if count[0] % 500 == 0:  # the receiver must still serve a real sender, exactly
            with Sender(layout, rx.address, secret=b"k", streams=1) as tx:
                xfer = tx.open(f"alive-{count[0]}", 3)
                xfer.send_layer(0, {"s": np.ones((4, 4), np.float32)})
                xfer.send_layer(1, {"k": np.ones((3, 2, 8), dtype=ml_dtypes.bfloat16)})
                xfer.finish(timeout=10)
            got = rx.wait(f"alive-{count[0]}", timeout=5)
            assert got.layer(0)["s"].sum() == 16
            got.release()

    atheris.Setup(
        [sys.argv[0], *libfuzzer_args], {"decoders": decoders, "handshake": handshake, "receiver": receiver}[target]
    )
    atheris.Fuzz()


def run(target: str, runs: int, seconds: int) -> dict:
    with tempfile.TemporaryDirectory() as corpus:
        args = [
            f"-runs={runs}",
            f"-max_total_time={seconds}",
            f"-artifact_prefix={corpus}/",
            "-print_final_stats=1",
            corpus,
        ]
        start = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "perf.fuzz", "--worker", target, "--", *args],
            capture_output=True,
            text=True,
            timeout=seconds + 120,
        )
        elapsed = time.monotonic() - start
    log = done.stdout + done.stderr
    execs = re.findall(r"stat::number_of_executed_units:\s*(\d+)", log)
    crashed = done.returncode != 0
    return {
        "target": target,
        "executions": int(execs[-1]) if execs else None,
        "seconds": round(elapsed, 1),
        "crashes": 1 if crashed else 0,
        "exit_code": done.returncode,
        "tail": log[-1500:] if crashed else "",
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", choices=(*TARGETS, "all"), default="all")
    ap.add_argument("--runs", type=int, default=20000)
    ap.add_argument("--seconds", type=int, default=120, help="time limit per target")
    ap.add_argument("--quick", action="store_true", help="CI-sized: 2000 runs per target, 30 s")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--worker", choices=TARGETS, help=argparse.SUPPRESS)
    args, rest = ap.parse_known_args(argv)
    if args.worker:
        _worker(args.worker, [a for a in rest if a != "--"])
        return 0
    if args.quick:
        args.runs, args.seconds = 2000, 30
    targets = TARGETS if args.target == "all" else (args.target,)
    results = [run(target, args.runs, args.seconds) for target in targets]
    report = {"benchmark": "fuzz", "results": results, "crashes": sum(r["crashes"] for r in results)}
    print(json.dumps(report) if args.json else json.dumps(report, indent=1))
    return 1 if report["crashes"] else 0


if __name__ == "__main__":
    sys.exit(main())
