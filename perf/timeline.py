"""A timeline of one small request at both ends: where its microseconds go.

    python -m perf timeline --json          # 200 requests of perf.requests' hybrid layout, one at a time
    python -m perf timeline --backend ucx --one-tensor-kib 1024   # one 1 MiB tensor per request, over UCX

The sender runs here, the receiver in a child process; both stamp events with
CLOCK_MONOTONIC (one clock for every process on a host). Events come from wrapping the
library's methods from outside (this module only; nothing in kvwire records them), so
each stamp costs about a microsecond of its own. For every request the events are put
on one time axis starting at ``Sender.open``; the JSON gives, per event (in the order it
first happens), its median time and the median gap since the event before it, over the
requests after the warm-up. Read it as: which steps are on the path from ``open`` to
``finish`` returning, and which gaps are thread hand-offs (one thread's event to another
thread's next event) rather than work.
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import os
import subprocess
import sys
import time

import numpy as np

from kvwire import KVLayout, Receiver, Sender, TensorSpec

from .requests import TOKENS, carve, hybrid_layout
from .transfer import as_layout_dtype, pattern

QUICK_ARGS = ["--requests", "30"]
EVENTS: list[tuple[int, str]] = []


def stamp(name: str) -> None:
    EVENTS.append((time.monotonic_ns(), name))


def wrap(owner, attr: str, label: str, *, before: bool = True, after: bool = True, detail=None) -> None:
    """Stamp ``label`` when ``owner.attr`` is called and when it returns."""
    original = getattr(owner, attr)

    @functools.wraps(original)
    def traced(*args, **kwargs):
        name = label if detail is None else f"{label}{detail(*args, **kwargs)}"
        if before:
            stamp(f"{name} >")
        try:
            return original(*args, **kwargs)
        finally:
            if after:
                stamp(f"{name} <")

    setattr(owner, attr, traced)


def connection_class(backend: str):
    if backend == "ucx":
        from kvwire.transport.ucx import UcxConnection

        return UcxConnection
    from kvwire.transport.tcp import TcpConnection

    return TcpConnection


def acked_layers(ack) -> str:
    """The layer an Ack names, or the layers of an Acks."""
    return f" {ack.layers}" if hasattr(ack, "layers") else f" {ack.layer}"


def trace_sender(backend: str) -> None:
    from kvwire import outbound, outbox, sender

    conn = connection_class(backend)
    wrap(sender.Sender, "open", "tx open")
    wrap(outbound.Transfer, "send_layer", "tx send_layer", detail=lambda self, layer, *a, **k: f" {layer}")
    wrap(outbound.Transfer, "finish", "tx finish")
    wrap(outbox.Outbox, "on_ack", "tx ack read", after=False, detail=lambda self, msg: acked_layers(msg))
    wrap(conn, "send", "tx conn send", detail=lambda self, buffers: f" ({len(buffers)} buffers)")


def trace_receiver(backend: str) -> None:
    from kvwire import landing, receiver

    conn = connection_class(backend)
    wrap(receiver.Receiver, "_on_open", "rx Open handled")
    wrap(landing.Landing, "receive", "rx payload", detail=lambda self, msg, *a: f" {msg.layer}")
    wrap(receiver.Receiver, "_ack", "rx ack sent", before=False,
         detail=lambda self, stream, state, ack, *a, **k: acked_layers(ack))
    wrap(conn, "recv_into", "rx conn recv", before=False)
    if hasattr(conn, "recv_some"):
        wrap(conn, "recv_some", "rx conn recv_some", before=False)
    wrap(conn, "send", "rx conn send", before=False)


def transport_options(args):
    if args.backend == "ucx" and args.shared_memory:
        from kvwire.transport.base import UcxOptions

        return UcxOptions(shared_memory=True)
    return None


def the_layout(one_tensor_kib: int) -> KVLayout:
    if one_tensor_kib:
        return KVLayout([{"x": TensorSpec((one_tensor_kib * 1024 // TOKENS,), "uint8", per_token=True)}])
    return hybrid_layout()


def receiver_main(args) -> None:
    trace_receiver(args.backend)
    requests = args.requests
    layout = the_layout(args.one_tensor_kib)
    rx = Receiver(layout, "127.0.0.1:0", max_bytes=1 << 30, backend=args.backend,
                  transport_options=transport_options(args))
    memory = np.ones((requests, layout.nbytes(TOKENS)), np.uint8)  # touched: np.zeros maps pages lazily
    for i in range(requests):
        rx.expect(f"r{i}", as_layout_dtype(carve(layout, memory[i]), layout))
    # the address only now: a sender that connected sooner could open r0 before its expect()
    print(json.dumps({"address": rx.address}), flush=True)
    per_request = []
    for i in range(requests):
        EVENTS.clear()
        got = rx.wait(f"r{i}", timeout=60)
        stamp("rx engine: wait returned")
        got.wait_layer(0, timeout=60)
        stamp("rx engine: layer 0 ready")
        got.wait_done(timeout=60)
        stamp("rx engine: all ready")
        got.release()
        per_request.append(list(EVENTS))
        print(json.dumps({"go": i}), flush=True)  # the sender opens the next one only now
    print(json.dumps({"events": per_request}), flush=True)
    rx.close()


def run(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--backend", choices=["tcp", "ucx"], default="tcp")
    ap.add_argument("--one-tensor-kib", type=int, default=0,
                    help="a one-layer layout of one tensor this large instead of the hybrid layout")
    ap.add_argument("--shared-memory", action="store_true", help="UcxOptions(shared_memory=True) at both ends")
    ap.add_argument("--role", choices=["receiver"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.role == "receiver":
        receiver_main(args)
        return {}
    child = subprocess.Popen([sys.executable, *os.environ.get("PERF_TIMELINE_RX", "-m perf.timeline").split(), "--role", "receiver", "--requests",
                              str(args.requests), "--backend", args.backend, "--one-tensor-kib",
                              str(args.one_tensor_kib), *(["--shared-memory"] if args.shared_memory else [])], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
    try:
        address = json.loads(child.stdout.readline())["address"]
        trace_sender(args.backend)
        layout = the_layout(args.one_tensor_kib)
        data = as_layout_dtype(pattern(layout, TOKENS, 0), layout)
        sent = []
        with Sender(layout, address, streams=1, backend=args.backend, transport_options=transport_options(args)) as tx:
            for i in range(args.requests):
                EVENTS.clear()
                xfer = tx.open(f"r{i}", TOKENS, timeout=60)
                for layer, tensors in enumerate(data):
                    xfer.send_layer(layer, tensors)
                xfer.finish()
                stamp("tx finish returned")
                sent.append(list(EVENTS))
                json.loads(child.stdout.readline())  # the receiver's engine is done with it
            received = json.loads(child.stdout.readline())["events"]
    finally:
        child.wait(timeout=30)
    result = summarize(sent[args.warmup:], received[args.warmup:], layout.nbytes(TOKENS))
    result["units"] = result["units"].replace("tcp", args.backend)
    return result


def summarize(sent: list, received: list, request_bytes: int) -> dict:
    """Per event label (numbered by occurrence within a request), median offset from open."""
    offsets: dict[str, list[float]] = collections.defaultdict(list)
    order: dict[str, float] = {}
    for tx_events, rx_events in zip(sent, received):
        start = tx_events[0][0]
        seen: collections.Counter = collections.Counter()
        for t, name in sorted(map(tuple, tx_events + rx_events)):
            seen[name] += 1
            key = name if seen[name] == 1 else f"{name} #{seen[name]}"
            offsets[key].append((t - start) / 1e3)
            order.setdefault(key, len(order))
    rows, previous = [], 0.0
    for key in sorted(offsets, key=lambda k: float(np.median(offsets[k]))):
        median = float(np.median(offsets[key]))
        rows.append({"event": key, "median_us": round(median, 1), "gap_us": round(median - previous, 1),
                     "p90_us": round(float(np.percentile(offsets[key], 90)), 1)})
        previous = median
    total = float(np.median([(tx[-1][0] - tx[0][0]) / 1e3 for tx in sent]))
    return {
        "benchmark": "timeline",
        "request_bytes": request_bytes,
        "requests": len(sent),
        "units": "microseconds from Sender.open (median over requests, one at a time, 1 stream, tcp loopback)",
        "open_to_finish_us": round(total, 1),
        "timeline": rows,
        "load_average": list(os.getloadavg()),
    }


def plot(result: dict, path: str) -> None:
    """Each event at its median time, the sender's above the receiver's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["timeline"]
    fig, ax = plt.subplots(figsize=(12, 0.16 * len(rows) + 1.5))
    for i, row in enumerate(rows):
        side = row["event"].split()[0]
        ax.plot([row["median_us"]], [-i], "o", color="tab:blue" if side == "tx" else "tab:orange", ms=3)
        ax.text(row["median_us"] + 5, -i, row["event"], fontsize=6, va="center")
    ax.set(xlabel="microseconds from Sender.open (median)", yticks=[],
           title=f"one request, {result['request_bytes']} bytes: tx (blue), rx (orange); "
                 f"open -> finish {result['open_to_finish_us']} us")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    result = run(argv)
    if result:
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
