"""Many small requests through one Sender into one Receiver, against a raw socket, in one run.

    python -m perf requests --json                      # 1,000 requests, 1 and 64 in flight, tcp and ucx
    python -m perf requests --backends tcp --inflight 1,8,64

The layout is a small hybrid model's KV: 6 linear-attention layers (a conv state and a
recurrent state each) and 2 full-attention layers (per-token K and V), 712 KiB per
request of 256 tokens. The receiver runs in a child process. A window of ``inflight``
requests is kept open: each is opened, all its layers sent, and the oldest is finished
when the window is full. Measured:

- requests/s and goodput (request bytes / elapsed) for kvwire (``kvwire``: one
  ``send_layer`` per layer, as a layer-by-layer prefill hands them over;
  ``kvwire_together``: the request's layers in one ``send_layers`` call, as an engine with
  all of them ready does, small ones then sharing a frame), for a raw socket moving the
  same bytes (each request one ``sendmsg`` of its layers into a preallocated buffer, one
  ack byte per request, the same window), and for the raw socket with the check kvwire
  makes (xxh3 of every layer at both ends, in series): the floor of any transport that
  checks every byte on this machine;
- open -> first layer ready, on the receiver (``Sender.open`` to ``wait_layer(0)``
  returning, CLOCK_MONOTONIC is shared by both processes): p50, p99 and max, so a starved
  request shows;
- CPU time (user + system, all threads) per request at each end, for kvwire and the raw
  socket: what a request costs, apart from how the two processes share the cores.

Receive memory is touched before timing (``np.zeros`` maps its pages lazily, and a first
write that faults would be counted against whoever wrote it).

Every request's bytes are compared with the sender's pattern at the end of each case.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import os
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import xxhash

from kvwire import KVLayout, Receiver, Sender, TensorSpec

from .transfer import as_layout_dtype, pattern

GB = 1e9
TOKENS = 256
BITS = {"float32": np.float32, "bfloat16": np.uint16, "uint8": np.uint8}  # how each dtype's bits are made here
QUICK_ARGS = ["--requests", "100", "--inflight", "1,16", "--backends", "tcp"]


def hybrid_layout() -> KVLayout:
    linear = {"conv": TensorSpec((3, 2048), "bfloat16"), "recurrent": TensorSpec((4, 64, 64), "float32")}
    full = {"k": TensorSpec((2, 64), "bfloat16", per_token=True), "v": TensorSpec((2, 64), "bfloat16", per_token=True)}
    return KVLayout([full if i % 4 == 3 else linear for i in range(8)])


def flat(layers) -> np.ndarray:
    return np.concatenate([a.reshape(-1).view(np.uint8) for t in layers for a in t.values()])


# -- receiver process --------------------------------------------------------------------------


def receiver(args) -> None:
    layout = hybrid_layout()
    patterns = [flat(pattern(layout, TOKENS, seed)) for seed in range(4)]
    rx = Receiver(layout, "127.0.0.1:0", backend=args.backend, max_bytes=4 << 30)
    lsock = socket.create_server(("127.0.0.1", 0))
    print(json.dumps({"kvwire": rx.address, "raw": lsock.getsockname()[1]}), flush=True)
    for line in sys.stdin:
        op = json.loads(line)
        if op["case"] == "kvwire":
            result = receive_kvwire(rx, op, patterns)
        elif op["case"] == "bye":
            print("{}", flush=True)
            return
        else:
            result = receive_raw(lsock, op, patterns, layout)
        print(json.dumps(result), flush=True)


def carve(layout: KVLayout, flat_buffer: np.ndarray) -> list[dict[str, np.ndarray]]:
    """An engine's view of one request's memory: every tensor a view into one flat buffer."""
    layers, position = [], 0
    for layer in layout.layers:
        tensors = {}
        for name, spec in layer.items():
            nbytes = spec.nbytes(TOKENS)
            dtype = BITS[spec.dtype]
            tensors[name] = flat_buffer[position : position + nbytes].view(dtype).reshape(spec.full_shape(TOKENS))
            position += nbytes
        layers.append(tensors)
    return layers


def receive_kvwire(rx: Receiver, op: dict, patterns) -> dict:
    """Like a decode engine: buffers of its own for every request (``expect``), the first
    layer used as soon as it is ready, the request released once all of it is. Bytes are
    compared after the last request, so that checking them does not slow the receiving."""
    layout = rx.layout
    nbytes = layout.nbytes(TOKENS)
    memory = np.ones((op["requests"], nbytes), np.uint8)  # touched before timing (np.zeros maps pages lazily)
    for i in range(op["requests"]):
        rx.expect(f"{op['tag']}-{i}", as_layout_dtype(carve(layout, memory[i]), layout))
    print(json.dumps({"ready": True}), flush=True)
    cpu0 = time.process_time()
    first_layer = {}
    for i in range(op["requests"]):
        rid = f"{op['tag']}-{i}"
        got = rx.wait(rid, timeout=120)
        got.wait_layer(0, timeout=120)
        first_layer[rid] = time.monotonic()
        got.wait_done(timeout=120)
        got.release()
    cpu_s = time.process_time() - cpu0
    ok = all(np.array_equal(memory[i], patterns[i % len(patterns)]) for i in range(op["requests"]))
    return {"first_layer": first_layer, "verified": bool(ok), "cpu_s": cpu_s}


def receive_raw(lsock, op: dict, patterns, layout) -> dict:
    nbytes = len(patterns[0])
    memory = np.ones((op["requests"], nbytes), np.uint8)  # touched, as above
    print(json.dumps({"ready": True}), flush=True)
    conn, _ = lsock.accept()
    cpu0 = time.process_time()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    bounds = np.cumsum([0] + [spec.nbytes(TOKENS) for layer in layout.layers for spec in layer.values()])
    for i in range(op["requests"]):
        buf = memory[i]
        view = memoryview(buf)
        while len(view):
            view = view[conn.recv_into(view, len(view), socket.MSG_WAITALL) :]
        if op["case"] == "raw_socket_xxh3":
            digests = [xxhash.xxh3_64_intdigest(buf[a:b]) for a, b in itertools.pairwise(bounds)]
            conn.sendall(b"k" if digests else b"x")
        else:
            conn.sendall(b"k")
    cpu_s = time.process_time() - cpu0
    conn.close()
    ok = all(np.array_equal(memory[i], patterns[i % len(patterns)]) for i in range(op["requests"]))
    return {"verified": bool(ok), "cpu_s": cpu_s}


# -- sender (this process) -----------------------------------------------------------------------


def send_kvwire(tx: Sender, data, tag: str, requests: int, inflight: int, together: bool = False) -> tuple[float, dict]:
    opened, window = {}, collections.deque()
    t0 = time.perf_counter()
    for i in range(requests):
        if len(window) >= inflight:
            window.popleft().finish()
        rid = f"{tag}-{i}"
        opened[rid] = time.monotonic()
        xfer = tx.open(rid, TOKENS, timeout=120)
        if together:
            xfer.send_layers(dict(enumerate(data[i % len(data)])))
        else:
            for layer, tensors in enumerate(data[i % len(data)]):
                xfer.send_layer(layer, tensors)
        window.append(xfer)
    while window:
        window.popleft().finish()
    return time.perf_counter() - t0, opened


def send_raw(port: int, data, requests: int, inflight: int, checked: bool) -> float:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buffers = [[memoryview(a.reshape(-1).view(np.uint8)) for t in layers for a in t.values()] for layers in data]
    window = threading.Semaphore(inflight)
    acks = []

    def read_acks():
        for _ in range(requests):
            acks.append(sock.recv(1, socket.MSG_WAITALL))
            window.release()

    reader = threading.Thread(target=read_acks)
    t0 = time.perf_counter()
    reader.start()
    for i in range(requests):
        window.acquire()
        pieces = buffers[i % len(buffers)]
        if checked:
            [xxhash.xxh3_64_intdigest(piece) for piece in pieces]
        views = list(pieces)
        while views:
            sent = sock.sendmsg(views)
            while views and sent >= len(views[0]):
                sent -= len(views[0])
                views.pop(0)
            if sent:
                views[0] = views[0][sent:]
    reader.join()
    elapsed = time.perf_counter() - t0
    sock.close()
    if acks.count(b"k") != requests:
        raise SystemExit("raw receiver did not confirm every request")
    return elapsed


def percentiles(values: list[float]) -> dict:
    ms = np.array(values) * 1e3
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3), "p99_ms": round(float(np.percentile(ms, 99)), 3),
            "max_ms": round(float(ms.max()), 3)}


def run_backend(backend: str, args) -> dict:
    child = subprocess.Popen(
        [sys.executable, *os.environ.get("PERF_REQUESTS_RX_PREFIX", "").split(), "-m", "perf.requests", "--role", "receiver", "--backend", backend],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    layout = hybrid_layout()
    raw_data = [pattern(layout, TOKENS, seed) for seed in range(4)]
    data = [as_layout_dtype(layers, layout) for layers in raw_data]
    nbytes = layout.nbytes(TOKENS)

    def ask(**op) -> dict:
        child.stdin.write(json.dumps(op) + "\n")
        child.stdin.flush()
        line = child.stdout.readline()
        if not line:
            raise SystemExit(f"receiver ({backend}) failed")
        return json.loads(line)

    rows = {}
    try:
        ports = json.loads(child.stdout.readline())
        with Sender(layout, ports["kvwire"], backend=backend, streams=args.streams) as tx:
            ask(case="kvwire", tag="warm", requests=20)
            send_kvwire(tx, data, "warm", 20, 4)  # connections and caches warm
            child.stdout.readline()
            for inflight in args.inflight:
                row = {}
                for case in ("kvwire", "kvwire_together"):
                    tag = f"{case}-w{inflight}"
                    ask(case="kvwire", tag=tag, requests=args.requests)  # its buffers are ready
                    cpu0 = time.process_time()
                    elapsed, opened = send_kvwire(tx, data, tag, args.requests, inflight, case == "kvwire_together")
                    tx_cpu = time.process_time() - cpu0
                    seen = json.loads(child.stdout.readline())
                    latency = [seen["first_layer"][rid] - opened[rid] for rid in opened]
                    row[case] = case_row(elapsed, args.requests, nbytes)
                    row[case].update(open_to_first_layer=percentiles(latency), verified=seen["verified"],
                                     **cpu_per_request(tx_cpu, seen["cpu_s"], args.requests))
                for case in ("raw_socket", "raw_socket_xxh3"):
                    ask(case=case, requests=args.requests)
                    cpu0 = time.process_time()
                    elapsed = send_raw(ports["raw"], raw_data, args.requests, inflight, case.endswith("xxh3"))
                    tx_cpu = time.process_time() - cpu0
                    row[case] = case_row(elapsed, args.requests, nbytes)
                    seen = json.loads(child.stdout.readline())
                    row[case].update(verified=seen["verified"], **cpu_per_request(tx_cpu, seen["cpu_s"], args.requests))
                for case in ("raw_socket", "raw_socket_xxh3"):
                    row[f"kvwire_over_{case}"] = round(row["kvwire"]["goodput_gbps"] / row[case]["goodput_gbps"], 3)
                    row[f"kvwire_together_over_{case}"] = round(
                        row["kvwire_together"]["goodput_gbps"] / row[case]["goodput_gbps"], 3)
                rows[f"inflight_{inflight}"] = row
        ask(case="bye")
    finally:
        child.stdin.close()
        child.wait(timeout=30)
    return rows


def cpu_per_request(sender_s: float, receiver_s: float, requests: int) -> dict:
    """CPU time (user + system, every thread) each end spent per request."""
    return {"sender_cpu_us": round(sender_s / requests * 1e6, 1), "receiver_cpu_us": round(receiver_s / requests * 1e6, 1)}


def case_row(elapsed: float, requests: int, nbytes: int) -> dict:
    return {"requests_per_s": round(requests / elapsed, 1), "goodput_gbps": round(requests * nbytes / elapsed / GB, 3),
            "seconds": round(elapsed, 4)}


def run(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--inflight", default="1,64", help="windows of requests in flight, comma-separated")
    ap.add_argument("--backends", default="tcp,ucx")
    ap.add_argument("--streams", type=int, default=None, help="Sender connections (default: the Sender's choice)")
    ap.add_argument("--quick", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--role", choices=["receiver"], help=argparse.SUPPRESS)
    ap.add_argument("--backend", default="tcp", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.role == "receiver":
        receiver(args)
        return {}
    args.inflight = [int(x) for x in args.inflight.split(",")]
    from kvwire.transport.ucx import ucx_available

    backends = [b for b in args.backends.split(",") if b != "ucx" or ucx_available()]
    layout = hybrid_layout()
    return {
        "benchmark": "requests",
        "layout": "8 layers: 6 linear (conv 3x2048 bf16 + recurrent 4x64x64 fp32), 2 attention (K, V 2x64 bf16 per token)",
        "request_bytes": layout.nbytes(TOKENS),
        "tokens": TOKENS,
        "requests": args.requests,
        "units": "goodput GB/s (1e9 B/s) of request bytes; latency ms from Sender.open to the receiver's wait_layer(0)",
        "results": {backend: run_backend(backend, args) for backend in backends},
        "skipped": [] if "ucx" in backends or "ucx" not in args.backends else ["ucx: ucxx not installed"],
        "load_average": list(os.getloadavg()),
        "cpus": os.cpu_count(),
    }


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for backend, rows in result["results"].items():
        windows = [int(k.split("_")[1]) for k in rows]
        left.plot(windows, [r["kvwire"]["goodput_gbps"] for r in rows.values()], "o-", label=f"kvwire {backend}")
        right.plot(windows, [r["kvwire"]["open_to_first_layer"]["p99_ms"] for r in rows.values()], "o-",
                   label=f"kvwire {backend} p99")
        right.plot(windows, [r["kvwire"]["open_to_first_layer"]["p50_ms"] for r in rows.values()], "x--",
                   label=f"kvwire {backend} p50")
    first = next(iter(result["results"].values()), {})
    windows = [int(k.split("_")[1]) for k in first]
    for case in ("raw_socket", "raw_socket_xxh3"):
        left.plot(windows, [r[case]["goodput_gbps"] for r in first.values()], "s:", label=case)
    left.set(xscale="log", xlabel="requests in flight", ylabel="goodput GB/s", title="712 KiB requests")
    right.set(xscale="log", yscale="log", xlabel="requests in flight", ylabel="open -> first layer (ms)")
    left.legend(fontsize=8)
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    print(json.dumps(run(sys.argv[1:]), indent=2))
