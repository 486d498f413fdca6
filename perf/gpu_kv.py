"""GPU check of kvwire's device path (run on a machine with an NVIDIA GPU; part of gpu_check.sh).

Two processes on one GPU: a Sender whose layers are torch CUDA tensors, over UCX, into a
Receiver whose ``expect`` buffers are CUDA tensors. Frames go out from device memory and
are checksummed on the GPU (blocksum) at both ends; the receiver compares every byte on
the GPU. Prints GB/s of the whole request (open to the receiver's last ack) next to a
device-to-device copy of the same bytes, the GPU checksum's own GB/s, and whether the
sender took device memory directly. Runs twice: with ``UcxOptions(shared_memory=True)``
(same-host transports: cuda_ipc) and with kvwire's default UCX options (error handling on).
``--device cpu`` runs the same with CPU tensors, a dry run for a machine without a GPU.

Variants, for A/B runs in one GPU session: ``--tensors-per-layer 2`` splits each layer
into two CUDA tensors (separate K and V, as many engines keep them), so a chunk spans two
buffers: the sender joins them on the device and the receiver lands the chunk in a
device buffer and copies it out, where one tensor per layer is received in place.
``--send-window-mib 0`` makes every UCX send wait until the peer has taken it, as 64 MiB
chunks did against the 16 MiB window before the newest send stopped counting against it.

    python -m perf.gpu_kv --json [--mib-per-layer 64 --layers 4]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from perf import devices

QUICK_ARGS = ["--mib-per-layer", "4", "--repeats", "2"]  # CI-sized, on a GPU
# without a GPU: host memory (devices.DRY_RUN_NOTE)
DRY_RUN_ARGS = ["--device", "cpu", "--mib-per-layer", "4", "--repeats", "2"]


def unavailable() -> str | None:
    return devices.ucx_missing() or devices.gpu_missing()


def names(per_layer: int) -> list[str]:
    return ["kv"] if per_layer == 1 else [f"kv{j}" for j in range(per_layer)]


def layout(layers: int, per_layer: int = 1):
    from kvwire import KVLayout, TensorSpec

    return KVLayout(
        [{name: TensorSpec((8, 128), "bfloat16", per_token=True) for name in names(per_layer)} for _ in range(layers)]
    )


def tensors(layers: int, tokens: int, seed: int, device: str = "cuda", per_layer: int = 1) -> list[dict]:
    import torch

    generator = torch.Generator(device=device).manual_seed(seed)
    return [
        {
            name: torch.randn(tokens, 8, 128, device=device, generator=generator).to(torch.bfloat16)
            for name in names(per_layer)
        }
        for _ in range(layers)
    ]


def options(shared_memory: bool, send_window_mib: int = -1):
    from kvwire.transport.ucx import UcxOptions

    window = {} if send_window_mib < 0 else {"send_window_bytes": send_window_mib << 20}
    return UcxOptions(shared_memory=shared_memory, **window)


class Profile:
    """yappi over every thread (wall clock) from ``start()`` on, its tables written to
    ``path`` at ``stop()``: where a request's time goes, per function. Off without a path."""

    def __init__(self, path: str | None):
        self.path = path

    def start(self) -> None:
        if self.path:
            import yappi

            yappi.set_clock_type("wall")
            yappi.start()

    def stop(self) -> None:
        if not self.path:
            return
        import yappi

        yappi.stop()
        with open(self.path, "w") as out:
            stats = yappi.get_func_stats()
            for column in ("tsub", "ttot"):
                out.write(f"== functions by {column}\n")
                stats.sort(column).print_all(
                    out=out, columns={0: ("name", 90), 1: ("ncall", 10), 2: ("tsub", 9), 3: ("ttot", 9)}
                )
            out.write("== threads\n")
            yappi.get_thread_stats().print_all(out=out)


def blocksum_matches_cpu() -> bool:
    """The GPU checksum kernel against its CPU definition on the real device: odd sizes,
    payloads that are and are not 4-byte aligned (the simulator checks the same in CI)."""
    import numpy as np

    from kvwire.cuda import checksum
    from kvwire.cuda.compat import cuda
    from kvwire.wire import blocksum

    same = True
    for nbytes, offset in ((1, 0), (4097, 0), (9 * 4096 + 3, 1), ((16 << 20) + 5, 3), (64 << 20, 0)):
        host = np.random.default_rng(nbytes).integers(0, 256, nbytes + offset, dtype=np.uint8)
        on_device = cuda.to_device(host)[offset:]
        same &= np.array_equal(checksum.block_digests(on_device), blocksum.block_digests(host[offset:]))
    return bool(same)


def receiver(args, tokens: int, profile: Profile) -> None:
    import torch

    from kvwire import Receiver

    expected = tensors(args.layers, tokens, seed=1, device=args.device, per_layer=args.tensors_per_layer)
    with Receiver(
        layout(args.layers, args.tensors_per_layer),
        "127.0.0.1:0",
        backend="ucx",
        secret=b"gpu",
        transport_options=options(args.shared_memory, args.send_window_mib),
    ) as rx:
        print(rx.address, flush=True)
        ok = True
        for rep in range(args.repeats):
            targets = [{name: torch.zeros_like(t) for name, t in layer.items()} for layer in expected]
            rx.expect(f"r{rep}", targets)
            print("expecting", flush=True)  # the sender opens the request only now
            with rx.wait(f"r{rep}", timeout=120) as got:
                got.wait_done(timeout=120)
            devices.synchronize(args.device)
            ok &= all(torch.equal(a[name], b[name]) for a, b in zip(targets, expected) for name in a)
            if rep == 0:
                profile.start()  # after the first request, which compiles the kernels
        profile.stop()
        print(json.dumps({"verified": ok}), flush=True)


def one_sender(args, tokens: int, kv: list, shared_memory: bool) -> dict:
    """One Sender against a fresh receiver process: seconds per request and the verdict."""
    from kvwire import Sender

    command = [
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
        "--device",
        args.device,
        "--tensors-per-layer",
        str(args.tensors_per_layer),
        "--send-window-mib",
        str(args.send_window_mib),
    ]
    if shared_memory:
        command.append("--shared-memory")
    profile = Profile(None)
    if args.profile:
        name = f"{'shared_memory' if shared_memory else 'default'}_{args.chunk_mib}mib"
        command += ["--profile", f"{args.profile}/receiver_{name}.txt"]
        profile = Profile(f"{args.profile}/sender_{name}.txt")
    with devices.receiver_process(command, stdout=subprocess.PIPE) as child:
        address = child.stdout.readline().strip()
        nbytes = sum(t.numel() * t.element_size() for layer in kv for t in layer.values())
        times = []
        chunking = {"chunk_bytes": args.chunk_mib << 20} if args.chunk_mib else {}
        with Sender(
            layout(args.layers, args.tensors_per_layer),
            address,
            backend="ucx",
            secret=b"gpu",
            transport_options=options(shared_memory, args.send_window_mib),
            **chunking,
        ) as tx:
            direct = tx.takes_device_memory
            transports = sorted(
                {getattr(conn, "transport", "?") for conn in tx.connections}
            )  # ucx-local / ucx-net
            for rep in range(args.repeats):
                child.stdout.readline()  # the receiver has its buffers in place
                devices.synchronize(args.device)
                t0 = time.perf_counter()
                xfer = tx.open(f"r{rep}", tokens, timeout=120)
                for i, layer in enumerate(kv):
                    xfer.send_layer(i, layer)
                xfer.finish(timeout=120)
                times.append(time.perf_counter() - t0)
                if rep == 0:
                    profile.start()
            profile.stop()
        verdict = json.loads(child.stdout.readline() or '{"verified": false}')
        child.wait(timeout=60)
        return {
            "verified": verdict["verified"],
            "sender_took_device_memory": direct,
            "connections": transports,
            "chunk_bytes": tx.chunk_bytes,
            "kvwire_ucx_gbps": round(nbytes / min(times) / 1e9, 3),
            "seconds": [round(t, 5) for t in times],
        }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib-per-layer", type=int, default=64)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", choices=["cuda", "cpu"], default=devices.default_device())
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--role", choices=["receiver"], help=argparse.SUPPRESS)
    ap.add_argument("--chunk-mib", type=int, default=0, help="the Sender's chunk_bytes in MiB (0: its default)")
    ap.add_argument("--settings", default="shared_memory,default", help="UCX options to run: shared_memory, default")
    ap.add_argument("--profile", metavar="DIR", help="write yappi tables of sender and receiver (after request 1)")
    ap.add_argument("--tensors-per-layer", type=int, default=1, help="CUDA tensors per layer (the layer's MiB split)")
    ap.add_argument("--send-window-mib", type=int, default=-1, help="UcxOptions.send_window_bytes (-1: its default)")
    ap.add_argument("--shared-memory", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    tokens = (args.mib_per_layer << 20) // (8 * 128 * 2 * args.tensors_per_layer)
    if args.role == "receiver":
        receiver(args, tokens, Profile(args.profile))
        return 0
    import torch

    kv = tensors(args.layers, tokens, seed=1, device=args.device, per_layer=args.tensors_per_layer)
    result = {
        "benchmark": "gpu_kv",
        "device": args.device,
        "bytes": sum(t.numel() * t.element_size() for layer in kv for t in layer.values()),
        "tensors_per_layer": args.tensors_per_layer,
        "send_window_mib": args.send_window_mib,
    }
    if args.device == "cpu":
        result["dry_run"] = devices.DRY_RUN_NOTE
    for name in args.settings.split(","):
        shared_memory = name == "shared_memory"
        try:
            result[name] = one_sender(args, tokens, kv, shared_memory)
        except Exception as exc:  # noqa: BLE001  (one setting failing must not hide the other's numbers)
            result[name] = {"error": f"{type(exc).__name__}: {exc}", "verified": False}
    if args.device == "cuda":
        from kvwire import device

        flat = next(iter(kv[0].values())).view(torch.uint8).reshape(-1)
        copy = torch.empty_like(flat)
        best_copy, best_sum = float("inf"), float("inf")
        payload, _, _ = device.device_bytes(flat)
        for _ in range(5):
            devices.synchronize("cuda")
            t0 = time.perf_counter()
            copy.copy_(flat)
            devices.synchronize("cuda")
            best_copy = min(best_copy, time.perf_counter() - t0)
            t0 = time.perf_counter()
            device.frame_blocksum(0, 0, 0, payload)
            best_sum = min(best_sum, time.perf_counter() - t0)
        result["device_to_device_copy_gbps"] = round(flat.numel() / best_copy / 1e9, 3)
        result["gpu_blocksum_gbps"] = round(flat.numel() / best_sum / 1e9, 3)
        result["gpu_blocksum_equals_cpu"] = blocksum_matches_cpu()
        result["gpu"] = torch.cuda.get_device_name(0)
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return 0 if all(result[name]["verified"] for name in args.settings.split(",")) else 1


if __name__ == "__main__":
    sys.exit(main())
