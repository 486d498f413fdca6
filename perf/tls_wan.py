"""perf tls-wan: kvwire's goodput with TLS next to plaintext, across the emulated WAN link.

Same link as ``perf wan`` (1 Gbit/s, 40 ms RTT, 0.1% loss, MTU 9000, bbr), kvwire's
default configuration, three 256 MiB transfers each way of connecting: a plaintext
receiver and a TLS receiver (self-signed certificate, verified by the sender).

    sudo python -m perf tls-wan --json
"""

from __future__ import annotations

import json
import sys

QUICK_ARGS = ["--quick"]


def unavailable() -> str | None:
    from perf.wanlink import unavailable_reason

    return unavailable_reason()


def run(argv: list[str] | None = None) -> dict:
    from perf.wan import tls_comparison

    argv = list(argv or [])
    if "--gib" not in argv and "--quick" not in argv:
        argv += ["--gib", "0.25"]
    if "--cc" not in argv:
        argv += ["--cc", "bbr"]
    return {"benchmark": "tls-wan", **tls_comparison([a for a in argv if a != "--json"])}


if __name__ == "__main__":
    print(json.dumps(run(sys.argv[1:])))
