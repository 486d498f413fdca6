"""One buffer between two processes over UCX: raw ucxx next to kvwire's UCX connection (gpu_check.sh).

The buffer lives in device memory (``--device cuda``: a torch CUDA tensor handed to UCX as
is, so cuda_ipc / cuda_copy carry it) or in host memory (``--device cpu``, which also runs
on a machine without a GPU). Each repeat: the sender sends the buffer, the receiver checks
every byte where it landed (on the GPU for CUDA) and answers one byte. Cases:

- ``raw_ucxx``: ucxx's core API with worker-address endpoints (perf.peers.RawUcxx);
- ``kvwire_shared_memory``: kvwire's UcxConnection with ``UcxOptions(shared_memory=True)``,
  endpoints set up like raw_ucxx (no UCX error handling, so same-host transports);
- ``kvwire_default``: kvwire's default, UCX error handling on (UCX then refuses some
  same-host transports: what it picks is what a user gets without setting anything).

Prints GB/s per case, its ratio to raw_ucxx, and a device-to-device (or host) copy of
the same bytes.

    python -m perf.gpu_ucx --json [--device cuda --mib 256 --repeats 5]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from perf import devices

QUICK_ARGS = ["--mib", "16", "--repeats", "2"]  # CI-sized, on a GPU
# without a GPU: host memory (devices.DRY_RUN_NOTE)
DRY_RUN_ARGS = ["--device", "cpu", "--mib", "16", "--repeats", "2"]


def unavailable() -> str | None:
    return devices.ucx_missing() or devices.gpu_missing()


CASES = ["raw_ucxx", "kvwire_shared_memory", "kvwire_default"]


class Buffers:
    """The payload, an empty target and equality, on the chosen device."""

    def __init__(self, device: str, nbytes: int):
        self.device = device
        if device == "cuda":
            import torch

            self.torch = torch
            gen = torch.Generator(device="cuda").manual_seed(7)
            self.expected = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device="cuda", generator=gen)
        else:
            import numpy as np

            self.expected = np.random.default_rng(7).integers(0, 256, nbytes, dtype=np.uint8)

    def empty(self):
        if self.device == "cuda":
            return self.torch.zeros_like(self.expected)
        import numpy as np

        return np.zeros_like(self.expected)

    def sync(self) -> None:
        devices.synchronize(self.device)

    def check_and_clear(self, got) -> bool:
        """Whether ``got`` holds the payload; zeroed afterwards for the next receive."""
        self.sync()
        same = (
            bool(self.torch.equal(got, self.expected)) if self.device == "cuda" else bool((got == self.expected).all())
        )
        got.zero_() if self.device == "cuda" else got.fill(0)
        self.sync()
        return same

    def copy_seconds(self, repeats: int) -> float:
        target, best = self.empty(), float("inf")
        for _ in range(repeats):
            self.sync()
            t0 = time.perf_counter()
            target[:] = self.expected
            self.sync()
            best = min(best, time.perf_counter() - t0)
        return best


def kvwire_options(case: str):
    from kvwire.transport.ucx import UcxOptions

    return UcxOptions(shared_memory=case == "kvwire_shared_memory")


def receiver(case: str, device: str, nbytes: int, repeats: int) -> None:
    """Child process: receive ``repeats`` times into one target, answer b"1" when every byte matched."""
    buffers = Buffers(device, nbytes)
    target = buffers.empty()
    buffers.sync()
    if case == "raw_ucxx":
        import numpy as np

        from perf.peers import RawUcxx

        ucx = RawUcxx()
        print(ucx.address.hex(), flush=True)
        ucx.connect(bytes.fromhex(sys.stdin.readline().strip()))
        array, answer = ucx.Array(target), np.zeros(1, dtype=np.uint8)
        for _ in range(repeats):
            ucx.wait(ucx.ep.tag_recv(array, ucx.api.UCXXTag(1)))
            answer[0] = ord("1") if buffers.check_and_clear(target) else ord("0")
            ucx.wait(ucx.ep.tag_send(ucx.Array(answer), ucx.api.UCXXTag(2)))
        sys.stdin.readline()  # the sender is done with us
        return
    from kvwire.transport import get_backend

    listener = get_backend("ucx").listen("127.0.0.1:0", options=kvwire_options(case))
    print(listener.address, flush=True)
    conn = listener.start_tls(listener.accept(), 30.0)
    print(json.dumps({"transport": conn.transport, "takes_device_memory": conn.capabilities.device_memory}), flush=True)
    for _ in range(repeats):
        conn.recv_into(target)  # UCX writes the target where it lives
        conn.send([b"1" if buffers.check_and_clear(target) else b"0"])
    sys.stdin.readline()
    conn.close()
    listener.close()


def sender(case: str, device: str, nbytes: int, repeats: int) -> dict:
    """Run one case against a fresh receiver process; seconds per repeat and whether all verified."""
    with devices.receiver_process(
        [
            sys.executable,
            "-m",
            "perf.gpu_ucx",
            "--role",
            "receiver",
            "--case",
            case,
            "--device",
            device,
            "--bytes",
            str(nbytes),
            "--repeats",
            str(repeats),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    ) as child:
        buffers = Buffers(device, nbytes)
        buffers.sync()
        address = child.stdout.readline().strip()
        if not address:
            child.wait(timeout=30)
            raise RuntimeError(f"{case}: the receiver exited with {child.returncode} before listening")
        times, verified, info = [], True, {}
        if case == "raw_ucxx":
            import numpy as np

            from perf.peers import RawUcxx

            ucx = RawUcxx()
            ucx.connect(bytes.fromhex(address))
            child.stdin.write(ucx.address.hex() + "\n")
            child.stdin.flush()
            payload, answer = ucx.Array(buffers.expected), np.zeros(1, dtype=np.uint8)
            for _ in range(repeats):
                t0 = time.perf_counter()
                send = ucx.ep.tag_send(payload, ucx.api.UCXXTag(1))
                got = ucx.ep.tag_recv(ucx.Array(answer), ucx.api.UCXXTag(2))
                ucx.wait(send)
                ucx.wait(got)
                times.append(time.perf_counter() - t0)
                verified &= bytes(answer) == b"1"
        else:
            from kvwire.transport import get_backend

            conn = get_backend("ucx").connect(address, timeout_s=30.0, options=kvwire_options(case))
            info = json.loads(child.stdout.readline())
            answer = memoryview(bytearray(1))
            for _ in range(repeats):
                t0 = time.perf_counter()
                conn.send([buffers.expected])  # from where it lives, no staging
                conn.recv_into(answer)
                times.append(time.perf_counter() - t0)
                verified &= bytes(answer) == b"1"
            info["sender_transport"] = conn.transport
            conn.close()
        child.stdin.write("done\n")
        child.stdin.flush()
        child.wait(timeout=60)
        return {"seconds": [round(t, 6) for t in times], "verified": verified, **info}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cuda", "cpu"], default=devices.default_device())
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--role", choices=["receiver"], help=argparse.SUPPRESS)
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument("--bytes", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.role == "receiver":
        receiver(args.case, args.device, args.bytes, args.repeats)
        return 0
    nbytes = args.mib << 20
    report: dict = {"benchmark": "gpu_ucx", "device": args.device, "bytes": nbytes, "cases": {}}
    if args.device == "cpu":
        report["dry_run"] = devices.DRY_RUN_NOTE
    for case in args.cases.split(","):
        try:
            result = sender(case, args.device, nbytes, args.repeats)
            result["gbps"] = round(nbytes / min(result["seconds"]) / 1e9, 3)
        except Exception as exc:  # noqa: BLE001  (one case failing must not hide the others' numbers)
            result = {"error": f"{type(exc).__name__}: {exc}"}
        report["cases"][case] = result
    raw = report["cases"].get("raw_ucxx", {}).get("gbps")
    for result in report["cases"].values():
        if raw and "gbps" in result:
            result["ratio_to_raw_ucxx"] = round(result["gbps"] / raw, 3)
    buffers = Buffers(args.device, nbytes)
    report["copy_gbps"] = round(nbytes / buffers.copy_seconds(args.repeats) / 1e9, 3)
    if args.device == "cuda":
        report["gpu"] = buffers.torch.cuda.get_device_name(0)
    print(json.dumps(report) if args.json else json.dumps(report, indent=2))
    return 0 if all(r.get("verified") for r in report["cases"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
