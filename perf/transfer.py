"""Loopback throughput of kvwire against a raw-socket baseline, in one run.

The receiver runs in a child process; this process sends. Both kvwire and the baseline
(one socket: sendall into recv_into of a preallocated buffer) move the same bytes into
buffers allocated and touched before timing, and are timed from the sender's first byte
to the receiver's confirmation that everything arrived. Afterwards the receiver compares
every byte with the sender's pattern. A second baseline, ``baseline_xxh3``, does the
check kvwire does by default: xxh3 of every layer at both ends, in series with each
layer's send and receive (one sendall and one receive per layer); no transport that
checks every byte gets far past it on this machine.

    python -m perf.transfer --backend tcp --streams 4 --mib 256 --json
    python -m perf.transfer --small-blocks --json      # 65,536 tensors of 1 KiB
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import socket
import subprocess
import sys
import time

import numpy as np
import xxhash

from kvwire import KVLayout, Receiver, Sender, TensorSpec

GB = 1e9


def make_layout(mib: int, small_blocks: bool) -> tuple[KVLayout, int]:
    """(layout, num_tokens). Big: 32 per-token layers. Small: 64 layers x 1024 tensors of 1 KiB."""
    if small_blocks:
        return KVLayout([{f"b{j}": TensorSpec((256,), "float32") for j in range(1024)} for _ in range(64)]), 0
    num_layers = 32
    layer_bytes = mib * 2**20 // num_layers
    tokens = layer_bytes // (8 * 128 * 2)
    return KVLayout([{"kv": TensorSpec((8, 128), "bfloat16", per_token=True)} for _ in range(num_layers)]), tokens


def pattern(layout: KVLayout, num_tokens: int, seed: int) -> list[dict[str, np.ndarray]]:
    """Deterministic data of the right shapes (raw bits, viewed as uint8 per element byte)."""
    rng = np.random.default_rng(seed)
    layers = []
    for layer in layout.layers:
        tensors = {}
        for name, spec in layer.items():
            shape = spec.full_shape(num_tokens)
            raw = rng.integers(0, 256, size=int(np.prod(shape)) * spec.itemsize, dtype=np.uint8)
            tensors[name] = raw.view({1: np.uint8, 2: np.uint16, 4: np.float32}[spec.itemsize]).reshape(shape)
        layers.append(tensors)
    return layers


def as_layout_dtype(layers, layout):
    """Our pattern arrays are uint16 for bf16; hand kvwire torch-free bf16 via ml_dtypes if present."""
    try:
        import ml_dtypes
    except ImportError:
        return layers
    out = []
    for tensors, specs in zip(layers, layout.layers):
        out.append({n: a.view(ml_dtypes.bfloat16) if specs[n].dtype == "bfloat16" else a for n, a in tensors.items()})
    return out


def layer_bounds(layers) -> list[tuple[int, int]]:
    """[start, end) of each layer's bytes in the layers joined back to back."""
    ends = list(itertools.accumulate(sum(a.nbytes for a in tensors.values()) for tensors in layers))
    return list(zip([0, *ends[:-1]], ends))


# -- receiver process ---------------------------------------------------------------------


def run_receiver(args) -> None:
    layout, num_tokens = make_layout(args.mib, args.small_blocks)
    expected = as_layout_dtype(pattern(layout, num_tokens, seed=1), layout)
    destinations = [{n: np.zeros_like(a) for n, a in t.items()} for t in expected]  # touched: zeros_like writes
    raw_total = sum(a.nbytes for t in expected for a in t.values())
    raw_buf = np.ones(raw_total, dtype=np.uint8)
    rx = Receiver(layout, "127.0.0.1:0", backend=args.backend, secret=b"bench")
    lsock = socket.create_server(("127.0.0.1", 0))
    print(json.dumps({"kvwire": rx.address, "raw": lsock.getsockname()[1]}), flush=True)
    results = {"arrays_seconds": []}
    verified = True
    for rep in range(args.repeats):
        if args.into == "expect":
            rx.expect(f"r{rep}", destinations)
        print("ready", flush=True)
        got = rx.wait(f"r{rep}", timeout=120)
        got.wait_done(timeout=300)
        t0 = time.perf_counter()
        received = got.wait_all()  # after completion: the sender's clock has stopped
        results["arrays_seconds"].append(round(time.perf_counter() - t0, 4))
        verified &= all(
            np.array_equal(r[n].view(np.uint8), e[n].view(np.uint8)) for r, e in zip(received, expected) for n in r
        )
        got.release()
    results["kvwire_verified"] = verified
    flat = np.concatenate([a.reshape(-1).view(np.uint8) for t in expected for a in t.values()])
    bounds = layer_bounds(expected)
    raw_ok = True
    for checked in (False, True):
        for rep in range(args.repeats):
            conn, _ = lsock.accept()
            for start, end in bounds if checked else [(0, raw_total)]:
                view = memoryview(raw_buf)[start:end]
                while len(view):
                    n = conn.recv_into(view, len(view), socket.MSG_WAITALL)
                    if n == 0:
                        raise SystemExit("baseline sender vanished")
                    view = view[n:]
                if checked:
                    xxhash.xxh3_64_intdigest(raw_buf[start:end])
            conn.sendall(b"k")
            conn.close()
        raw_ok &= np.array_equal(flat, raw_buf)
        raw_buf[:] = 1  # the checked baseline must fill it again
    results["raw_verified"] = raw_ok
    results["verified_bytes"] = raw_total
    print(json.dumps(results), flush=True)
    rx.close()


# -- sender (this process) ----------------------------------------------------------------


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default="tcp")
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--small-blocks", action="store_true", help="65,536 tensors of 1 KiB in one request")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--chunk-kib", type=int, default=4096)
    ap.add_argument(
        "--into",
        choices=["expect", "own"],
        default="expect",
        help="receive into preallocated engine buffers (rx.expect) or receiver-allocated memory",
    )
    ap.add_argument("--json", action="store_true", help="print only the JSON result")
    ap.add_argument("--role", choices=["sender", "receiver"], default="sender", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.role == "receiver":
        return run_receiver(args)

    child_args = [
        sys.executable,
        "-m",
        "perf.transfer",
        "--role",
        "receiver",
        "--backend",
        args.backend,
        "--mib",
        str(args.mib),
        "--repeats",
        str(args.repeats),
        "--into",
        args.into,
    ] + (["--small-blocks"] if args.small_blocks else [])
    child = subprocess.Popen(child_args, stdout=subprocess.PIPE, text=True)
    try:
        ports = json.loads(child.stdout.readline())
        layout, num_tokens = make_layout(args.mib, args.small_blocks)
        data = as_layout_dtype(pattern(layout, num_tokens, seed=1), layout)
        total = sum(a.nbytes for t in data for a in t.values())

        kv_times, queue_times = [], []
        with Sender(
            layout,
            ports["kvwire"],
            backend=args.backend,
            streams=args.streams,
            secret=b"bench",
            chunk_bytes=args.chunk_kib * 1024,
        ) as tx:
            for rep in range(args.repeats):
                if child.stdout.readline().strip() != "ready":  # receiver posted expect() and verified the last
                    raise SystemExit("receiver process failed")
                t0 = time.perf_counter()
                xfer = tx.open(f"r{rep}", num_tokens, timeout=300)
                for i, tensors in enumerate(data):
                    xfer.send_layer(i, tensors)
                queued = time.perf_counter() - t0
                xfer.finish()
                kv_times.append(time.perf_counter() - t0)
                queue_times.append(queued)

        flat = np.concatenate([a.reshape(-1).view(np.uint8) for t in data for a in t.values()])
        bounds = layer_bounds(data)
        raw_times, raw_xxh3_times = [], []
        for times, checked in ((raw_times, False), (raw_xxh3_times, True)):
            for rep in range(args.repeats):
                sock = socket.create_connection(("127.0.0.1", ports["raw"]))
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                t0 = time.perf_counter()
                for start, end in bounds if checked else [(0, total)]:
                    if checked:
                        xxhash.xxh3_64_intdigest(flat[start:end])
                    sock.sendall(flat[start:end])
                if sock.recv(1) != b"k":
                    raise SystemExit("baseline receiver did not confirm")
                times.append(time.perf_counter() - t0)
                sock.close()
        verdict = json.loads(child.stdout.readline())
    finally:
        child.wait(timeout=60)

    gbps = total / min(kv_times) / GB
    baseline = total / min(raw_times) / GB
    checked_baseline = total / min(raw_xxh3_times) / GB
    result = {
        "benchmark": "transfer",
        "case": "small_blocks_65536x1KiB" if args.small_blocks else f"{args.mib}MiB",
        "backend": args.backend,
        "streams": args.streams,
        "into": args.into,
        "bytes": total,
        "units": "GB/s (1e9 bytes/s), best of repeats",
        "gbps": round(gbps, 3),
        "baseline_gbps": round(baseline, 3),
        "ratio": round(gbps / baseline, 3),
        "baseline_xxh3_gbps": round(checked_baseline, 3),
        "ratio_to_xxh3": round(gbps / checked_baseline, 3),
        "kvwire_seconds": [round(t, 4) for t in kv_times],
        "baseline_seconds": [round(t, 4) for t in raw_times],
        "baseline_xxh3_seconds": [round(t, 4) for t in raw_xxh3_times],
        "send_layer_seconds": [round(t, 4) for t in queue_times],
        # the receiver's wait_all() once the request is complete: the engine's arrays (views of
        # the receiver's memory in the ``own`` case), not in the clock above
        "arrays_seconds": verdict["arrays_seconds"],
        "verified": bool(verdict["kvwire_verified"] and verdict["raw_verified"]),
        "verified_bytes": verdict["verified_bytes"],
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
    }
    print(json.dumps(result, indent=None if args.json else 2))


if __name__ == "__main__":
    main()
