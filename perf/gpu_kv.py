"""GPU check of kvwire's device path (run on a machine with an NVIDIA GPU; part of gpu_check.sh).

Two processes on one GPU: a Sender whose layers are torch CUDA tensors, over UCX, into a
Receiver whose ``expect`` buffers are CUDA tensors. Frames go out from device memory and
are checksummed on the GPU (blocksum) at both ends; the receiver compares every byte on
the GPU. Prints GB/s of the whole request (open to the receiver's last ack) next to a
device-to-device copy of the same bytes, the GPU checksum's own GB/s, and whether the
sender took device memory directly.

    python -m perf.gpu_kv --json [--mib-per-layer 64 --layers 4]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def layout(layers: int, tokens: int):
    from kvwire import KVLayout, TensorSpec

    return KVLayout([{"kv": TensorSpec((8, 128), "bfloat16", per_token=True)} for _ in range(layers)])


def tensors(layers: int, tokens: int, seed: int):
    import torch

    generator = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(tokens, 8, 128, device="cuda", generator=generator).to(torch.bfloat16) for _ in range(layers)]


def receiver(layers: int, tokens: int, repeats: int) -> None:
    import torch

    from kvwire import Receiver

    expected = tensors(layers, tokens, seed=1)
    with Receiver(layout(layers, tokens), "127.0.0.1:0", backend="ucx", secret=b"gpu") as rx:
        print(rx.address, flush=True)
        ok = True
        for rep in range(repeats):
            targets = [torch.zeros_like(t) for t in expected]
            rx.expect(f"r{rep}", [{"kv": t} for t in targets])
            with rx.wait(f"r{rep}", timeout=120) as got:
                got.wait_done(timeout=120)
            torch.cuda.synchronize()
            ok &= all(torch.equal(a, b) for a, b in zip(targets, expected))
        print(json.dumps({"verified": ok}), flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--mib-per-layer", type=int, default=64)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--role", choices=["receiver"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    tokens = (args.mib_per_layer << 20) // (8 * 128 * 2)
    if args.role == "receiver":
        receiver(args.layers, tokens, args.repeats)
        return 0
    import torch

    from kvwire import Sender, device

    child = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "perf.gpu_kv",
            "--role",
            "receiver",
            "--layers",
            str(args.layers),
            "--mib-per-layer",
            str(args.mib_per_layer),
            "--repeats",
            str(args.repeats),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    address = child.stdout.readline().strip()
    kv = tensors(args.layers, tokens, seed=1)
    nbytes = sum(t.numel() * 2 for t in kv)
    times = []
    with Sender(layout(args.layers, tokens), address, backend="ucx", streams=1, secret=b"gpu") as tx:
        direct = tx.takes_device_memory
        for rep in range(args.repeats):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            xfer = tx.open(f"r{rep}", tokens, timeout=120)
            for i, tensor in enumerate(kv):
                xfer.send_layer(i, {"kv": tensor})
            xfer.finish(timeout=120)
            times.append(time.perf_counter() - t0)
    verdict = json.loads(child.stdout.readline() or '{"verified": false}')
    child.wait(timeout=60)
    flat = kv[0].view(torch.uint8).reshape(-1)
    copy = torch.empty_like(flat)
    best_copy, best_sum = float("inf"), float("inf")
    payload, _, _ = device.device_bytes(flat)
    for _ in range(5):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        copy.copy_(flat)
        torch.cuda.synchronize()
        best_copy = min(best_copy, time.perf_counter() - t0)
        t0 = time.perf_counter()
        device.frame_blocksum(0, 0, 0, payload)
        best_sum = min(best_sum, time.perf_counter() - t0)
    result = {
        "benchmark": "gpu_kv",
        "bytes": nbytes,
        "verified": verdict["verified"],
        "sender_took_device_memory": direct,
        "kvwire_ucx_gbps": round(nbytes / min(times) / 1e9, 3),
        "device_to_device_copy_gbps": round(flat.numel() / best_copy / 1e9, 3),
        "gpu_blocksum_gbps": round(flat.numel() / best_sum / 1e9, 3),
        "seconds": [round(t, 5) for t in times],
        "gpu": torch.cuda.get_device_name(0),
    }
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return 0 if verdict["verified"] else 1


if __name__ == "__main__":
    sys.exit(main())
