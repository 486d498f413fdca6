"""kvwire next to raw sockets, raw ucxx, NIXL and Mooncake on loopback, in one run.

    python -m perf.peers --json
    python -m perf.peers --sizes 1,16 --peers-python /tmp/peers-venv/bin/python

Every case moves the same bytes between two processes: a target that owns a receive
buffer (allocated and touched before timing) and an initiator that owns a send buffer of
a fixed random pattern. A transfer is timed from its first byte until the initiator knows
the bytes have landed:

- ``raw_socket``: one TCP socket, ``sendall`` into ``recv_into(MSG_WAITALL)``, one-byte ack.
- ``raw_ucxx``: ucxx tag send into a posted tag receive, one-byte ack; same endpoint setup
  as kvwire's UCX backend (worker addresses; shared memory on one host) and the same way of
  waiting (the waiting thread progresses the worker).
- ``raw_ucxx_xxh3``: ``raw_ucxx`` plus the integrity check kvwire does, in series and with
  nothing else: the initiator hashes the buffer (xxh3-64) and sends the digest with the
  data, the target hashes what landed and acks only if it matches. What any transport that
  checks every byte at both ends costs on this path before its own overheads.
- ``kvwire_tcp`` / ``kvwire_ucx`` / ``kvwire_ucx_default``: ``send_layer`` + ``finish()``
  (``kvwire_ucx``: endpoints set up like ``raw_ucxx``, ``UcxOptions(shared_memory=True)``;
  ``kvwire_ucx_default``: kvwire's default, UCX error handling on; ``*_unchecked``: both
  ends ``verify=False``, no frame checksums, for fabrics both ends trust; otherwise the receiver has verified
  the checksums and acked) into ``rx.expect`` buffers.
- ``nixl_ucx``: NIXL WRITE with its UCX backend (error handling "none", so it may use shared
  memory too) until ``check_xfer_state`` says DONE.
- ``mooncake_tcp``: Mooncake Transfer Engine ``transfer_sync_write`` over its TCP transport
  (P2PHANDSHAKE metadata, no etcd).

NIXL and Mooncake are benchmark-only peers: they run as subprocesses from a separate venv
(``--peers-python``) and are never imported by kvwire. After each size the target compares
every byte with the pattern. Results are GB/s (1e9 B/s), best of the repeats, and each
case's ratio to ``raw_socket``. The CPUs may be shared with other work: the load average
is reported next to the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np

GB = 1e9
MIB = 1 << 20
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = [
    "raw_socket",
    "raw_ucxx",
    "raw_ucxx_xxh3",
    "kvwire_tcp",
    "kvwire_ucx",
    "kvwire_ucx_default",
    "kvwire_ucx_unchecked",
    "kvwire_tcp_unchecked",
    "nixl_ucx",
    "mooncake_tcp",
]
PEER_CASES = {"nixl_ucx", "mooncake_tcp"}
TOKEN_BYTES = 1024
CHUNK_KIB = [0]  # kvwire's chunk size, set by --chunk-kib (0: the Sender's own choice, Sender.chunk_bytes)


def repeats_for(nbytes: int) -> int:
    return 20 if nbytes <= MIB else 8 if nbytes <= 16 * MIB else 4


def pattern(nbytes: int) -> np.ndarray:
    return np.random.default_rng(12345).integers(0, 256, size=nbytes, dtype=np.uint8)


# -- the control channel between a target and its initiator --------------------------------


class Control:
    """JSON lines over a TCP socket."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.file = sock.makefile("rwb", buffering=0)

    def send(self, **message) -> None:
        self.file.write(json.dumps(message).encode() + b"\n")

    def recv(self) -> dict:
        line = self.file.readline()
        if not line:
            raise SystemExit("control channel closed")
        return json.loads(line)


def serve_control() -> tuple[socket.socket, int]:
    lsock = socket.create_server(("127.0.0.1", 0))
    return lsock, lsock.getsockname()[1]


def target_loop(control: Control, buf: np.ndarray, expected: np.ndarray, on_message=None) -> None:
    """Answer the initiator: 'prep' (case hook), 'verify' (compare, then zero), 'bye'."""
    while True:
        msg = control.recv()
        if msg["op"] == "verify":
            n = msg["nbytes"]
            ok = bool(np.array_equal(buf[:n], expected[:n]))
            buf[:n] = 0
            control.send(ok=ok)
        elif msg["op"] == "bye":
            control.send(ok=True)
            return
        else:
            control.send(**(on_message(msg) or {}))


# -- targets (receivers) ---------------------------------------------------------------------


def target(case: str, max_bytes: int) -> None:
    buf = np.ones(max_bytes, dtype=np.uint8)  # ones writes every page (zeros maps them lazily): touched before timing
    expected = pattern(max_bytes)
    lsock, cport = serve_control()
    info = {"control": cport}
    hook = None
    if case == "raw_socket":
        data_l, info["data"] = serve_control()
    elif case.startswith("raw_ucxx"):
        ucx = RawUcxx(checked=case == "raw_ucxx_xxh3")
        info["address"] = ucx.address.hex()
    elif case.startswith("kvwire_"):
        from kvwire import Receiver

        backend, options = kvwire_backend(case)
        rx = Receiver(kv_layout(), "127.0.0.1:0", backend=backend, secret=b"peers", transport_options=options,
                      verify=not case.endswith("_unchecked"))
        info["address"] = rx.address
    elif case == "nixl_ucx":
        agent, _ = nixl_agent("target", buf)
        info["meta"] = agent.get_agent_metadata().hex()
        info["addr"] = buf.ctypes.data
    elif case == "mooncake_tcp":
        engine = mooncake_engine(buf)
        info["segment"] = f"127.0.0.1:{engine.get_rpc_port()}"
        info["addr"] = buf.ctypes.data
    print(json.dumps(info), flush=True)
    csock, _ = lsock.accept()
    control = Control(csock)

    if case == "raw_socket":
        dsock, _ = data_l.accept()

        def hook(msg):
            n = msg["nbytes"]
            for _ in range(msg["repeats"]):
                view = memoryview(buf)[:n]
                while len(view):
                    got = dsock.recv_into(view, len(view), socket.MSG_WAITALL)
                    if not got:
                        raise SystemExit("initiator vanished")
                    view = view[got:]
                dsock.sendall(b"k")

    elif case.startswith("raw_ucxx"):

        def hook(msg):
            if msg["op"] == "connect":
                ucx.connect(bytes.fromhex(msg["address"]))
            else:
                ucx.serve(buf[: msg["nbytes"]], msg["repeats"])

    elif case.startswith("kvwire_"):

        def hook(msg):
            if msg["op"] == "expect":
                rx.expect(msg["rid"], [{"x": buf[: msg["nbytes"]].reshape(-1, TOKEN_BYTES)}])
            else:  # "wait": the sender's clock has stopped; free the request for the next one
                with rx.wait(msg["rid"], timeout=60) as got:
                    got.wait_done(timeout=60)

    target_loop(control, buf, expected, hook)
    os._exit(0)  # NIXL's target may crash in interpreter teardown, after the data has arrived


# -- initiators (senders) ----------------------------------------------------------------------


def initiator(case: str, info: dict, sizes: list[int], streams: int | None) -> None:
    src = pattern(max(sizes))
    control = Control(socket.create_connection(("127.0.0.1", info["control"])))
    seconds: dict[str, list[float]] = {}
    verified = True
    send_one = setup_sender(case, info, src, control, streams)
    extra = {"streams": send_one.streams} if hasattr(send_one, "streams") else {}
    for n in sizes:
        times = []
        repeats = repeats_for(n)
        send_one.prepare(n, repeats)
        for rep in range(repeats):
            times.append(send_one(n, rep))
        send_one.finish_size(n)
        control.send(op="verify", nbytes=n)
        verified &= control.recv()["ok"]
        seconds[str(n)] = times
    send_one.close()
    control.send(op="bye")
    control.recv()
    print(json.dumps({"seconds": seconds, "verified": verified, **extra}), flush=True)
    os._exit(0)


class Sending:
    """Base of each case's timed transfer: ``__call__(nbytes, rep) -> seconds``."""

    def prepare(self, nbytes: int, repeats: int) -> None: ...

    def finish_size(self, nbytes: int) -> None: ...

    def close(self) -> None: ...


def setup_sender(case: str, info: dict, src: np.ndarray, control: Control, streams: int | None) -> Sending:
    if case == "raw_socket":
        return SocketSending(info, src, control)
    if case.startswith("raw_ucxx"):
        return UcxxSending(info, src, control, checked=case == "raw_ucxx_xxh3")
    if case.startswith("kvwire_"):
        return KvwireSending(case, info, src, control, streams)
    if case == "nixl_ucx":
        return NixlSending(info, src)
    if case == "mooncake_tcp":
        return MooncakeSending(info, src)
    raise SystemExit(f"unknown case {case}")


class SocketSending(Sending):
    def __init__(self, info, src, control):
        self.src, self.control = src, control
        self.sock = socket.create_connection(("127.0.0.1", info["data"]))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def prepare(self, nbytes, repeats):
        self.control.send(op="recv", nbytes=nbytes, repeats=repeats)  # answered after all repeats

    def __call__(self, nbytes, rep):
        t0 = time.perf_counter()
        self.sock.sendall(memoryview(self.src)[:nbytes])
        if self.sock.recv(1) != b"k":
            raise SystemExit("raw socket target did not confirm")
        return time.perf_counter() - t0

    def finish_size(self, nbytes):
        self.control.recv()


class RawUcxx:
    """ucxx's core API the way kvwire uses it: worker-address endpoints, self-progress."""

    def __init__(self, checked: bool = False):
        from kvwire.transport.ucx.library import load_ucxx  # (notes ucxx's import-time defaults as such)

        api, Array = load_ucxx()
        self.api, self.Array, self.checked = api, Array, checked
        self.digest = np.zeros(1, dtype=np.uint64)
        self.context = api.UCXContext(
            {"WARN_UNUSED_ENV_VARS": "n"}, feature_flags=(api.Feature.TAG, api.Feature.WAKEUP)
        )
        self.worker = api.UCXWorker(self.context)
        self.worker.init_blocking_progress_mode()
        self.address = bytes(self.worker.address)
        self.ack = np.zeros(1, dtype=np.uint8)

    def connect(self, peer: bytes) -> None:
        address = self.api.UCXAddress.create_from_buffer(peer)
        self.ep = self.api.UCXEndpoint.create_from_worker_address(self.worker, address, False)

    def wait(self, request) -> None:
        while not request.completed:
            self.worker.progress_worker_event(1)
        request.check_error()

    def serve(self, view: np.ndarray, repeats: int) -> None:
        array = self.Array(view)
        for _ in range(repeats):
            requests = [self.ep.tag_recv(array, self.api.UCXXTag(1))]
            if self.checked:
                requests.append(self.ep.tag_recv(self.Array(self.digest), self.api.UCXXTag(3)))
            for request in requests:
                self.wait(request)
            if self.checked and xxh3(view) != int(self.digest[0]):
                raise SystemExit("raw_ucxx_xxh3: digest mismatch")
            self.wait(self.ep.tag_send(self.Array(self.ack), self.api.UCXXTag(2)))


def xxh3(view: np.ndarray) -> int:
    import xxhash

    return xxhash.xxh3_64_intdigest(memoryview(view))


class UcxxSending(Sending):
    def __init__(self, info, src, control, checked=False):
        self.ucx, self.src, self.control = RawUcxx(checked), src, control
        self.ucx.connect(bytes.fromhex(info["address"]))
        control.send(op="connect", address=self.ucx.address.hex())
        control.recv()
        self.ack = np.zeros(1, dtype=np.uint8)

    def prepare(self, nbytes, repeats):
        self.control.send(op="recv", nbytes=nbytes, repeats=repeats)

    def __call__(self, nbytes, rep):
        u = self.ucx
        t0 = time.perf_counter()
        if u.checked:
            u.digest[0] = xxh3(self.src[:nbytes])
            digest = u.ep.tag_send(u.Array(u.digest), u.api.UCXXTag(3))
        send = u.ep.tag_send(u.Array(self.src[:nbytes]), u.api.UCXXTag(1))
        ack = u.ep.tag_recv(u.Array(self.ack), u.api.UCXXTag(2))
        u.wait(send)
        if u.checked:
            u.wait(digest)
        u.wait(ack)
        return time.perf_counter() - t0

    def finish_size(self, nbytes):
        self.control.recv()


def kvwire_backend(case: str):
    """(backend, transport options) of a kvwire case.

    ``kvwire_ucx`` sets its endpoints up like ``raw_ucxx`` (no UCX error handling, so shared
    memory / CMA on one host: ``UcxOptions(shared_memory=True)``); ``kvwire_ucx_default``
    is kvwire's default, UCX error handling everywhere (on one host: UCX's tcp transport),
    which survives a peer killed mid-transfer. ``*_unchecked``: as the case without the
    suffix, with ``verify=False`` at both ends (set where the Sender and Receiver are made).
    """
    case = case.removesuffix("_unchecked")
    if case == "kvwire_tcp":
        return "tcp", None
    from kvwire.transport.ucx import UcxOptions

    return "ucx", (UcxOptions(shared_memory=True) if case == "kvwire_ucx" else UcxOptions())


def kv_layout():
    from kvwire import KVLayout, TensorSpec

    return KVLayout([{"x": TensorSpec((TOKEN_BYTES,), "uint8", per_token=True)}])


class KvwireSending(Sending):
    def __init__(self, case, info, src, control, streams):
        from kvwire import Sender

        backend, options = kvwire_backend(case)
        self.src, self.control = src, control
        self.tx = Sender(
            kv_layout(),
            info["address"],
            backend=backend,
            transport_options=options,
            streams=streams,
            secret=b"peers",
            chunk_bytes=CHUNK_KIB[0] * 1024 or None,
            verify=not case.endswith("_unchecked"),
        )
        self.streams = self.tx.num_streams  # what streams=None chose, when not given

    def __call__(self, nbytes, rep):
        rid = f"r{nbytes}-{rep}"
        self.control.send(op="expect", rid=rid, nbytes=nbytes)
        self.control.recv()
        tensor = self.src[:nbytes].reshape(-1, TOKEN_BYTES)
        t0 = time.perf_counter()
        xfer = self.tx.open(rid, nbytes // TOKEN_BYTES)
        xfer.send_layer(0, {"x": tensor})
        xfer.finish(timeout=120)
        elapsed = time.perf_counter() - t0
        self.control.send(op="wait", rid=rid)
        self.control.recv()
        return elapsed

    def close(self):
        self.tx.close()


def nixl_agent(name: str, buf: np.ndarray):
    from nixl_cu12._api import nixl_agent as agent_class
    from nixl_cu12._api import nixl_agent_config

    agent = agent_class(name, nixl_agent_config(backends=[]))
    agent.create_backend("UCX", {"ucx_error_handling_mode": "none"})
    reg = agent.register_memory([(buf.ctypes.data, buf.nbytes, 0, "")], "DRAM")
    return agent, reg


class NixlSending(Sending):
    def __init__(self, info, src):
        self.agent, self.reg = nixl_agent("initiator", src)
        self.remote = self.agent.add_remote_agent(bytes.fromhex(info["meta"]))
        self.src, self.raddr = src, info["addr"]
        self.handles = {}

    def prepare(self, nbytes, repeats):
        local = self.agent.get_xfer_descs([(self.src.ctypes.data, nbytes, 0)], "DRAM")
        remote = self.agent.get_xfer_descs([(self.raddr, nbytes, 0)], "DRAM")
        self.handle = self.agent.initialize_xfer("WRITE", local, remote, self.remote, b"n")

    def __call__(self, nbytes, rep):
        t0 = time.perf_counter()
        state = self.agent.transfer(self.handle)
        while state == "PROC":
            state = self.agent.check_xfer_state(self.handle)
        if state != "DONE":
            raise SystemExit(f"NIXL transfer failed: {state}")
        return time.perf_counter() - t0


def mooncake_engine(buf: np.ndarray):
    from mooncake.engine import TransferEngine

    engine = TransferEngine()
    if engine.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") != 0:
        raise SystemExit("Mooncake initialize failed")
    if engine.register_memory(buf.ctypes.data, buf.nbytes) != 0:
        raise SystemExit("Mooncake register_memory failed")
    return engine


class MooncakeSending(Sending):
    def __init__(self, info, src):
        self.engine, self.src = mooncake_engine(src), src
        self.segment, self.raddr = info["segment"], info["addr"]

    def __call__(self, nbytes, rep):
        t0 = time.perf_counter()
        if self.engine.transfer_sync_write(self.segment, self.src.ctypes.data, self.raddr, nbytes) != 0:
            raise SystemExit("Mooncake transfer failed")
        return time.perf_counter() - t0


# -- the coordinator ---------------------------------------------------------------------------


def role_command(python: str, case: str, role: str) -> list[str]:
    if case in PEER_CASES:  # the peers' venv has no kvwire: run this file as a script
        return [python, os.path.abspath(__file__), "--role", role, "--case", case]
    return [python, "-m", "perf.peers", "--role", role, "--case", case]


def size_label(nbytes: int) -> str:
    """``16MiB``, ``64KiB``: the key of a size in the results, and what ``--sizes`` reads back."""
    return f"{nbytes // MIB}MiB" if nbytes % MIB == 0 else f"{nbytes // 1024}KiB"


def parse_sizes(text: str) -> list[int]:
    """``1,16,256`` (MiB), or with units: ``64KiB,1MiB,256M``."""
    sizes = []
    for item in text.split(","):
        item = item.strip().removesuffix("iB").removesuffix("B")
        scale = {"K": 1024, "M": MIB}.get(item[-1:].upper(), 0)
        number = item[:-1] if scale else item
        if not number.isdigit() or int(number) == 0:
            raise SystemExit(f"--sizes: {item!r} is not a whole number of KiB or MiB (say 64K, 1M or 16)")
        sizes.append(int(number) * (scale or MIB))
    return sizes


def run_case(case: str, sizes: list[int], python: str, streams: str, timeout_s: float) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    common = [
        "--sizes",
        ",".join(size_label(n) for n in sizes),
        "--streams",
        streams,
        "--chunk-kib",
        str(CHUNK_KIB[0]),
    ]
    tgt = subprocess.Popen(
        role_command(python, case, "target") + common,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )
    ini = None
    try:
        line = tgt.stdout.readline()
        while line and not line.startswith("{"):  # NIXL logs to stdout
            line = tgt.stdout.readline()
        if not line:
            return {"error": f"target did not start: {tgt.stderr.read()[-800:]}"}
        ini = subprocess.Popen(
            role_command(python, case, "initiator") + common + ["--info", line.strip()],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=ROOT,
        )
        out, err = ini.communicate(timeout=timeout_s)
        lines = [ln for ln in out.splitlines() if ln.startswith("{")]
        if not lines:
            return {"error": f"initiator failed (rc {ini.returncode}): {err[-800:]}"}
        return json.loads(lines[-1])
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s}s"}
    finally:
        for proc in (ini, tgt):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()


def summarize(raw: dict, sizes: list[int]) -> dict:
    out = {}
    for case, result in raw.items():
        if "error" in result:
            out[case] = {"error": result["error"]}
            continue
        out[case] = {"verified": result["verified"]}
        for n in sizes:
            best = min(result["seconds"][str(n)])
            out[case][size_label(n)] = {"gbps": round(n / best / GB, 3), "best_seconds": round(best, 6)}
    for reference in ("raw_socket", "raw_ucxx", "raw_ucxx_xxh3"):
        base = out.get(reference, {})
        for case, result in out.items():
            for key, cell in result.items():
                if isinstance(cell, dict) and "gbps" in base.get(key, {}):
                    cell[f"ratio_to_{reference}"] = round(cell["gbps"] / base[key]["gbps"], 3)
    for case, result in raw.items():
        if "streams" in result:
            out[case]["streams"] = result["streams"]
    return out


def streams_label(result: dict) -> str:
    """ " (N streams)" for a kvwire case, which reports what its Sender opened."""
    if "streams" not in result:
        return ""
    return f" ({result['streams']} stream{'s' * (result['streams'] > 1)})"


def table(summary: dict, sizes: list[int]) -> str:
    nan = float("nan")
    keys = [size_label(n) for n in sizes]
    lines = [f"{'case':<19}" + "".join(f"{k + ' GB/s':>14}{'x sock':>8}{'x ucxx':>8}" for k in keys)]
    for case, result in summary.items():
        if "error" in result:
            lines.append(f"{case:<19}  unavailable: {result['error'][:100]}")
            continue
        row = f"{case:<19}"
        for k in keys:
            cell = result[k]
            row += f"{cell['gbps']:>14.3f}{cell.get('ratio_to_raw_socket', nan):>8.2f}{cell.get('ratio_to_raw_ucxx', nan):>8.2f}"
        lines.append(row + streams_label(result) + ("" if result["verified"] else "  (NOT VERIFIED)"))
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    """GB/s per size (log scale), one bar per case; raw ucxx's level dashed across each size.
    More than four sizes: goodput against size, a line per case (log-log)."""
    import matplotlib.pyplot as plt

    from perf.plots import finish_figure  # (sets matplotlib's Agg backend)

    cases = {c: r for c, r in result["results"].items() if "error" not in r}
    sizes = list(result["repeats"])
    if len(sizes) > 4:
        nbytes = parse_sizes(",".join(sizes))
        fig, ax = plt.subplots(figsize=(9, 5))
        for case, cells in cases.items():
            style = ":" if case.startswith("raw_") else "-"
            ax.plot(nbytes, [cells[k]["gbps"] for k in sizes], "o" + style, label=case + streams_label(cells), ms=3)
        ax.set(xscale="log", yscale="log", xlabel="bytes per transfer", ylabel="GB/s (best of repeats)")
        ax.set_xticks(nbytes, sizes, fontsize=7)
        ax.set_title("goodput against transfer size, loopback, two processes, every byte verified", fontsize=10)
        ax.legend(fontsize=7, ncol=3)
        finish_figure(fig, ax, result, path)
        return
    fig, ax = plt.subplots(figsize=(9, 5))
    width = 0.8 / max(1, len(cases))
    for i, (case, cells) in enumerate(cases.items()):
        xs = [s + (i - (len(cases) - 1) / 2) * width for s in range(len(sizes))]
        bars = ax.bar(xs, [cells[k]["gbps"] for k in sizes], width, label=case + streams_label(cells))
        ax.bar_label(bars, fmt="%.1f", fontsize=6)
    if "raw_ucxx" in cases:
        for s, key in enumerate(sizes):
            ax.hlines(cases["raw_ucxx"][key]["gbps"], s - 0.42, s + 0.42, colors="0.3", linestyles="dashed", lw=0.8)
    ax.set_xticks(range(len(sizes)), sizes)
    ax.set_yscale("log")
    ax.set_ylabel("GB/s (best of repeats)")
    ax.set_title("loopback, two processes, every byte verified (dashed: raw ucxx)", fontsize=10)
    ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.08))
    finish_figure(fig, ax, result, path)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print the JSON only")
    ap.add_argument("--sizes", default="1,16,256",
                    help="MiB, comma-separated, or with units (64K,256K,1M,...,256M: a curve instead of bars)")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument(
        "--streams", default="auto", help="kvwire connections per Sender (auto: the Sender's own choice, streams=None)"
    )
    ap.add_argument("--chunk-kib", type=int, default=0,
                    help="kvwire chunk size (0: the Sender's choice: 4 MiB; 64 MiB unchecked over one connection)")
    ap.add_argument(
        "--peers-python",
        default="/tmp/peers-venv/bin/python",
        help="a python with nixl-cu12 and mooncake-transfer-engine-non-cuda installed",
    )
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per case")
    ap.add_argument("--role", choices=["target", "initiator"], help=argparse.SUPPRESS)
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument("--info", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    sizes = parse_sizes(args.sizes)
    CHUNK_KIB[0] = args.chunk_kib
    if args.role == "target":
        return target(args.case, max(sizes))
    if args.role == "initiator":
        return initiator(args.case, json.loads(args.info), sizes, None if args.streams == "auto" else int(args.streams))

    from perf.plots import machine_info  # not at the top: the peers' venv runs this file without matplotlib

    load_before = os.getloadavg()
    raw = {}
    for case in args.cases.split(","):
        python = args.peers_python if case in PEER_CASES else sys.executable
        if case in PEER_CASES and not os.path.exists(python):
            raw[case] = {"error": f"{python} not found (see --peers-python)"}
            continue
        raw[case] = run_case(case, sizes, python, args.streams, args.timeout)
    summary = summarize(raw, sizes)
    result = {
        "benchmark": "peers",
        "units": "GB/s (1e9 bytes/s), best of repeats; ratio_to_raw_socket and ratio_to_raw_ucxx per size",
        "transport": "loopback, two processes",
        "repeats": {size_label(n): repeats_for(n) for n in sizes},
        "kvwire_streams": args.streams,
        "kvwire_chunk_bytes": args.chunk_kib * 1024 or "the Sender's choice (4 MiB; 64 MiB for *_unchecked)",
        "results": summary,
        "load_average_before_after": [round(x, 2) for x in (*load_before, *os.getloadavg())],
        "caveat": "the CPUs may be shared with other work; compare cases from the same run only",
        "machine": machine_info(),
    }
    if not args.json:
        print(table(summary, sizes))
    print(json.dumps(result, indent=None if args.json else 2))


if __name__ == "__main__":
    main()
