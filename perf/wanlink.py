"""An emulated cross-datacenter link between two network namespaces (Linux, root).

This kernel has no ``netem``, so delay, jitter, loss and the rate limit are applied by a
small userspace relay. Each side is a network namespace with one TUN device, ``wan0``;
one relay process per direction reads the packets one side's kernel sends into its TUN
device and writes them into the other side's, at the time the emulated link would
deliver them::

    namespace a (10.99.0.1) -- wan0 --> relay a->b --> wan0 -- namespace b (10.99.0.2)
                                    <-- relay b->a <--

Per direction, a packet is dropped with probability ``loss``; otherwise it is queued
behind the packets already waiting for the ``rate_mbit`` bottleneck (tail-dropped when
more than ``queue_bytes`` wait, like a router's buffer), serialized, and delivered
``rtt_ms / 2`` (plus ``jitter_ms`` uniform noise, never reordering) later.

    from perf.wanlink import LinkSpec, WanLink

    with WanLink(LinkSpec(rate_mbit=1000, rtt_ms=40, loss=0.001), congestion_control="reno") as link:
        server = link.popen("b", ["iperf3", "-s", "-1", "-B", link.addr_b])
        link.run("a", ["iperf3", "-c", link.addr_b, "-n", "1G"], timeout=120)

Both namespaces get TCP buffer limits raised to ``tcp_buffer_max_bytes`` (a long fat link
needs a window of at least its bandwidth-delay product per connection), tcp metrics
caching off (so one run's ssthresh does not leak into the next), and, when asked, a
congestion control. Everything is removed on exit, on exceptions and on Ctrl-C; the
relays also remove the namespaces if the process that made them dies.

Python's per-packet cost limits the relay. Measured on 2 vCPUs: at MTU 9000 the two
relays carry ~950 Mbit/s for about 0.45 of a core together (``WanLink.relay_cpu_seconds``;
a third of it Python, the rest the kernel's receive path for the injected packets); at
MTU 1500 one TCP stream got ~860 Mbit/s for 0.66 of a core, with drops where the relay
fell behind, so emulate rates near 1 Gbit/s at MTU 9000.

CLI (``python -m perf.wanlink --help``)::

    python -m perf.wanlink --rate-mbit 1000 --rtt-ms 40 --loss 0.001 --cc reno        # hold until Ctrl-C
    python -m perf.wanlink --rtt-ms 40 --side a -- ping -c 3 10.99.0.2                 # run one command
    python -m perf.wanlink check --rate-mbit 1000 --rtt-ms 40                          # measure the link
    python -m perf.wanlink cleanup                                                      # stale namespaces

This file imports only the standard library, so the relay and probe processes start fast.
"""

from __future__ import annotations

import argparse
import collections
import fcntl
import itertools
import json
import logging
import os
import random
import select
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import time
import weakref
from dataclasses import asdict, dataclass

log = logging.getLogger(__name__)
log.addHandler(logging.NullHandler())

NAME_PREFIX = "kvwan"
ADDR_A = "10.99.0.1"
ADDR_B = "10.99.0.2"
_TUNSETIFF = 0x400454CA
_IFF_TUN = 0x0001
_IFF_NO_PI = 0x1000
_SEQUENCE = itertools.count()
_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


class WanError(RuntimeError):
    """The link could not be built or a command in it failed."""


@dataclass(frozen=True)
class LinkSpec:
    """What the emulated link does, the same in both directions.

    ``rate_mbit`` is the bottleneck rate (0: unlimited), ``rtt_ms`` the round-trip
    propagation delay, ``jitter_ms`` the half-width of uniform noise added to each
    one-way delay, ``loss`` the probability that a packet is dropped in each direction,
    ``mtu`` the devices' MTU, and ``queue_bytes`` the bottleneck buffer (None: one
    bandwidth-delay product, at least 64 KiB).
    """

    rate_mbit: float = 1000.0
    rtt_ms: float = 40.0
    jitter_ms: float = 0.0
    loss: float = 0.0
    mtu: int = 9000
    queue_bytes: int | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.rate_mbit <= 100_000:
            raise ValueError(f"rate_mbit must be in [0, 100000], got {self.rate_mbit}")
        if not 0 <= self.rtt_ms <= 10_000:
            raise ValueError(f"rtt_ms must be in [0, 10000], got {self.rtt_ms}")
        if not 0 <= self.jitter_ms <= self.rtt_ms / 2:
            raise ValueError(f"jitter_ms must be in [0, rtt_ms / 2], got {self.jitter_ms} (rtt_ms {self.rtt_ms})")
        if not 0 <= self.loss < 1:
            raise ValueError(f"loss must be a probability in [0, 1), got {self.loss}")
        if not 576 <= self.mtu <= 65_000:
            raise ValueError(f"mtu must be in [576, 65000], got {self.mtu}")
        if self.queue_bytes is not None and self.queue_bytes < self.mtu:
            raise ValueError(f"queue_bytes must hold at least one packet ({self.mtu}), got {self.queue_bytes}")

    @property
    def bottleneck_queue_bytes(self) -> int:
        if self.queue_bytes is not None:
            return self.queue_bytes
        return max(64 * 1024, int(self.rate_mbit * 1e6 / 8 * self.rtt_ms / 1000))


def unavailable_reason() -> str | None:
    """Why a WanLink cannot be built here, or None if it can."""
    if not sys.platform.startswith("linux"):
        return f"needs Linux network namespaces (this is {sys.platform})"
    if os.geteuid() != 0:
        return "needs root (creating network namespaces and TUN devices)"
    if shutil.which("ip") is None:
        return "needs the `ip` command (iproute2)"
    if not os.path.exists("/dev/net/tun"):
        return "needs /dev/net/tun"
    probe = f"{NAME_PREFIX}-{os.getpid()}-probe{next(_SEQUENCE)}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"`ip netns add` fails here: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(["ip", *args], check=False, capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise WanError(f"`ip {' '.join(args)}` failed: {done.stderr.strip()}")
    return done


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cleanup_stale() -> list[str]:
    """Delete namespaces left by WanLinks whose process has died; returns their names."""
    listed = _ip("netns", "list", check=False).stdout.split("\n")
    removed = []
    for line in listed:
        name = line.split(" ")[0]
        parts = name.split("-")
        if len(parts) >= 3 and parts[0] == NAME_PREFIX and parts[1].isdigit() and not _pid_alive(int(parts[1])):
            _ip("netns", "del", name, check=False)
            removed.append(name)
    return removed


def _open_tun(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH22x", name.encode(), _IFF_TUN | _IFF_NO_PI))
    except OSError:
        os.close(fd)
        raise
    return fd


class WanLink:
    """Two namespaces joined by an emulated link; a context manager.

    Parameters
    ----------
    spec : LinkSpec
        Rate, RTT, jitter, loss, MTU and bottleneck buffer.
    congestion_control : str, optional
        Set as ``net.ipv4.tcp_congestion_control`` in both namespaces (here: ``"reno"``
        or ``"bbr"``); None keeps the namespaces' default.
    tcp_buffer_max_bytes : int
        Maximum of ``net.ipv4.tcp_rmem`` / ``tcp_wmem`` in both namespaces.
    seed : int, optional
        Seed of the relays' loss and jitter draws (random if None).
    """

    def __init__(
        self,
        spec: LinkSpec,
        *,
        congestion_control: str | None = None,
        tcp_buffer_max_bytes: int = 32 << 20,
        seed: int | None = None,
    ):
        self.spec = spec
        self.congestion_control = congestion_control
        self.tcp_buffer_max_bytes = tcp_buffer_max_bytes
        self.seed = random.randrange(1 << 30) if seed is None else seed
        base = f"{NAME_PREFIX}-{os.getpid()}-{next(_SEQUENCE)}"
        self.namespaces = {"a": f"{base}-a", "b": f"{base}-b"}
        self.addr_a, self.addr_b = ADDR_A, ADDR_B
        self._relays: list[subprocess.Popen] = []
        self._children: list[subprocess.Popen] = []
        self._started = False
        self._finalizer = weakref.finalize(
            self, _teardown, list(self.namespaces.values()), self._relays, self._children
        )

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> WanLink:
        """Build the namespaces, devices and relays (cleaned up again if any step fails)."""
        reason = unavailable_reason()
        if reason is not None:
            raise WanError(f"cannot emulate a WAN link: {reason}")
        cleanup_stale()
        self._started = True
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        log.info("WAN link %s <-> %s up: %s", *self.namespaces.values(), self.spec)
        return self

    def _build(self) -> None:
        fds = {}
        try:
            for side, addr, peer in (("a", ADDR_A, ADDR_B), ("b", ADDR_B, ADDR_A)):
                ns = self.namespaces[side]
                _ip("netns", "add", ns)
                _ip("-n", ns, "link", "set", "lo", "up")
                tmp = f"kw{os.getpid() % 100000}{side}{next(_SEQUENCE) % 10000}"
                fds[side] = _open_tun(tmp)
                _ip("link", "set", "dev", tmp, "netns", ns)
                _ip("-n", ns, "link", "set", "dev", tmp, "name", "wan0")
                _ip("-n", ns, "link", "set", "dev", "wan0", "mtu", str(self.spec.mtu), "txqueuelen", "10000", "up")
                _ip("-n", ns, "addr", "add", addr, "peer", peer, "dev", "wan0")
                self._set_sysctls(side)
            for src, dst, direction in (("a", "b", 0), ("b", "a", 1)):
                self._relays.append(self._start_relay(fds[src], fds[dst], direction))
        finally:
            for fd in fds.values():  # the relays hold their own copies; the devices live as long as they do
                os.close(fd)
        for relay in self._relays:
            if relay.stdout.readline().strip() != "ready":
                raise WanError(f"relay process failed to start (exit {relay.poll()})")

    def _set_sysctls(self, side: str) -> None:
        values = {
            "net/ipv4/tcp_rmem": f"4096 131072 {self.tcp_buffer_max_bytes}",
            "net/ipv4/tcp_wmem": f"4096 16384 {self.tcp_buffer_max_bytes}",
            "net/ipv4/tcp_no_metrics_save": "1",
        }
        if self.congestion_control:
            values["net/ipv4/tcp_congestion_control"] = self.congestion_control
        script = "; ".join(f"echo '{v}' > /proc/sys/{k}" for k, v in values.items())
        done = subprocess.run(
            ["ip", "netns", "exec", self.namespaces[side], "sh", "-ec", script],
            check=False,
            capture_output=True,
            text=True,
            timeout=30,
        )
        if done.returncode != 0:
            raise WanError(f"setting {sorted(values)} in namespace {side} failed: {done.stderr.strip()}")

    def _start_relay(self, fd_in: int, fd_out: int, direction: int) -> subprocess.Popen:
        spec = self.spec
        argv = [
            sys.executable,
            os.path.abspath(__file__),
            "_relay",
            "--fd-in",
            str(fd_in),
            "--fd-out",
            str(fd_out),
            "--delay-s",
            repr(spec.rtt_ms / 2000),
            "--jitter-s",
            repr(spec.jitter_ms / 1000),
            "--loss",
            repr(spec.loss),
            "--rate-bps",
            repr(spec.rate_mbit * 1e6),
            "--queue-bytes",
            str(spec.bottleneck_queue_bytes),
            "--mtu",
            str(spec.mtu),
            "--seed",
            str(self.seed * 2 + direction),
            "--parent",
            str(os.getpid()),
            "--namespaces",
            *self.namespaces.values(),
        ]
        return subprocess.Popen(
            argv, pass_fds=(fd_in, fd_out), stdout=subprocess.PIPE, text=True, start_new_session=True
        )  # Ctrl-C reaches us, and we tear down in order

    def close(self) -> None:
        """Stop processes started in the namespaces, the relays, and delete the namespaces."""
        if self._started:
            self._finalizer()
            self._started = False
            log.info("WAN link %s <-> %s removed", *self.namespaces.values())

    def __enter__(self) -> WanLink:  # noqa: PYI034 - Python 3.10 has no typing.Self
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- running things inside ------------------------------------------------------------

    def command(self, side: str, argv: list[str]) -> list[str]:
        """``argv`` prefixed so that it runs in namespace ``side`` ("a" or "b")."""
        if side not in self.namespaces:
            raise ValueError(f"side must be 'a' or 'b', got {side!r}")
        return ["ip", "netns", "exec", self.namespaces[side], *argv]

    def run(self, side: str, argv: list[str], *, timeout: float = 60.0, **kwargs) -> subprocess.CompletedProcess:
        """Run ``argv`` in namespace ``side`` to completion (``subprocess.run`` keywords)."""
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        check = kwargs.pop("check", False)
        return subprocess.run(self.command(side, argv), check=check, timeout=timeout, **kwargs)

    def popen(self, side: str, argv: list[str], **kwargs) -> subprocess.Popen:
        """Start ``argv`` in namespace ``side``; it is stopped when the link closes."""
        proc = subprocess.Popen(self.command(side, argv), **kwargs)
        self._children.append(proc)
        return proc

    def relay_cpu_seconds(self) -> float:
        """CPU time (user + system) the relay processes have used so far."""
        total = 0.0
        for relay in self._relays:
            try:
                with open(f"/proc/{relay.pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += (int(fields[11]) + int(fields[12])) / _CLK_TCK
        return total

    @property
    def relay_pids(self) -> list[int]:
        return [relay.pid for relay in self._relays]


def _stop(proc: subprocess.Popen, grace_s: float) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


def _teardown(namespaces: list[str], relays: list[subprocess.Popen], children: list[subprocess.Popen]) -> None:
    for proc in children:
        _stop(proc, grace_s=3.0)
    for ns in namespaces:  # what our children started in the namespaces and left behind
        for pid in _ip("netns", "pids", ns, check=False).stdout.split():
            log.warning("killing process %s left in namespace %s", pid, ns)
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
    for relay in relays:
        _stop(relay, grace_s=2.0)
    for ns in namespaces:
        _ip("netns", "del", ns, check=False)


# -- the relay process (one per direction) --------------------------------------------------


def _relay(args: argparse.Namespace) -> None:
    """Forward packets from fd_in to fd_out with loss, a rate limit, a queue and delay."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    fd_in, fd_out = args.fd_in, args.fd_out
    os.set_blocking(fd_in, False)
    rng = random.Random(args.seed)
    loss, delay, jitter = args.loss, args.delay_s, args.jitter_s
    sec_per_byte = 8.0 / args.rate_bps if args.rate_bps > 0 else 0.0
    max_backlog_s = args.queue_bytes * sec_per_byte
    pending: collections.deque = collections.deque()
    read, write, now, wait_readable = os.read, os.write, time.monotonic, select.select
    size = args.mtu + 64
    free_at = last_release = 0.0  # when the bottleneck is next idle; release time of the last packet
    next_parent_check = 0.0
    print("ready", flush=True)
    while True:
        t = now()
        if t >= next_parent_check:
            if os.getppid() != args.parent:  # our creator died without cleaning up: do it ourselves
                for ns in args.namespaces:
                    subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True, timeout=30)
                return
            next_parent_check = t + 1.0
        timeout = min(1.0, pending[0][0] - t) if pending else 1.0
        if timeout > 0:
            wait_readable((fd_in,), (), (), timeout)
        t = now()
        for _ in range(512):
            try:
                packet = read(fd_in, size)
            except BlockingIOError:
                break
            if loss and rng.random() < loss:
                continue
            if sec_per_byte:
                start = max(t, free_at)
                if start - t > max_backlog_s:
                    continue  # bottleneck buffer full: tail drop
                free_at = start + len(packet) * sec_per_byte
                release = free_at + delay
            else:
                release = t + delay
            if jitter:
                release += rng.uniform(-jitter, jitter)
            release = max(release, last_release)  # jitter never reorders packets
            last_release = release
            pending.append((release, packet))
        t = now()
        while pending and pending[0][0] <= t:
            try:
                write(fd_out, pending.popleft()[1])
            except OSError:
                pass  # the receiving side's stack refused it: a drop, as on a real link


# -- probes: measure what the link does (stdlib only, run inside the namespaces) ----------------

PROBE_PORT = 47001


def _probe_server(args: argparse.Namespace) -> None:
    """TCP: accept; a connection that sends 8 bytes of length gets the arrival times back.
    UDP: count datagrams until a TCP connection asks for the count."""
    tcp = socket.create_server((args.host, PROBE_PORT), backlog=64)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    udp.bind((args.host, PROBE_PORT))
    udp.setblocking(False)
    received = set()
    deadline = time.monotonic() + args.seconds
    print("ready", flush=True)
    while time.monotonic() < deadline:
        readable, _, _ = select.select([tcp, udp], [], [], 0.5)
        if udp in readable:
            while True:
                try:
                    received.add(udp.recv(2048)[:8])
                except BlockingIOError:
                    break
        if tcp in readable:
            conn, _ = tcp.accept()
            conn.settimeout(60)
            header = conn.recv(9, socket.MSG_WAITALL)
            if len(header) == 9 and header[:1] == b"T":
                (total,) = struct.unpack("!Q", header[1:])
                conn.sendall(json.dumps(_receive_timed(conn, total)).encode())
            elif header[:1] == b"U":
                time.sleep(0.3)  # the last datagrams are still on the link
                while True:
                    try:
                        received.add(udp.recv(2048)[:8])
                    except BlockingIOError:
                        break
                conn.sendall(json.dumps({"udp_received": len(received)}).encode())
                received.clear()
            conn.close()


def _receive_timed(conn: socket.socket, total: int) -> dict:
    buf = bytearray(1 << 20)
    marks = [int(total * f) for f in (0.25, 0.5, 0.75, 1.0)]
    times, got = [], 0
    while got < total:
        n = conn.recv_into(buf, min(len(buf), total - got))
        if n == 0:
            break
        got += n
        while marks and got >= marks[0]:
            times.append(time.monotonic())
            marks.pop(0)
    return {"bytes": got, "mark_bytes": [int(total * f) for f in (0.25, 0.5, 0.75, 1.0)], "mark_times": times}


def _probe_client(args: argparse.Namespace) -> None:
    """Prints JSON: connect RTTs, goodput of the last 3/4 of a bounded transfer, UDP loss."""
    out: dict = {}
    rtts = []
    for _ in range(args.connects):
        t0 = time.monotonic()
        sock = socket.create_connection((args.host, PROBE_PORT), timeout=10)
        rtts.append((time.monotonic() - t0) * 1000)
        sock.close()
        time.sleep(0.02)
    out["connect_rtt_ms"] = rtts
    if args.transfer_bytes:
        sock = socket.create_connection((args.host, PROBE_PORT), timeout=60)
        sock.sendall(b"T" + struct.pack("!Q", args.transfer_bytes))
        block = b"\x5a" * (1 << 20)
        left = args.transfer_bytes
        while left:
            left -= sock.send(block[: min(len(block), left)])
        timed = json.loads(_recv_all(sock))
        sock.close()
        b, t = timed["mark_bytes"], timed["mark_times"]
        out["rate_mbit"] = (b[-1] - b[0]) * 8 / (t[-1] - t[0]) / 1e6 if len(t) == 4 and t[-1] > t[0] else 0.0
    if args.datagrams:
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        payload = b"\0" * 192
        for i in range(args.datagrams):
            udp.sendto(struct.pack("!Q", i) + payload, (args.host, PROBE_PORT))
            if i % 50 == 49:
                time.sleep(0.002)  # stay far below the link rate: loss must come from `loss` alone
        sock = socket.create_connection((args.host, PROBE_PORT), timeout=10)
        sock.sendall(b"U" + bytes(8))
        received = json.loads(_recv_all(sock))["udp_received"]
        sock.close()
        out["udp_sent"], out["udp_received"] = args.datagrams, received
        out["loss"] = 1 - received / args.datagrams
    print(json.dumps(out), flush=True)


def _recv_all(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        data = sock.recv(65536)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


def measure(
    link: WanLink, *, connects: int = 10, transfer_bytes: int = 0, datagrams: int = 0, timeout_s: float = 60.0
) -> dict:
    """Measure the link from a to b: ``connect_rtt_ms`` (TCP handshakes), ``rate_mbit``
    (goodput of the last 3/4 of a ``transfer_bytes`` transfer), ``loss`` (of ``datagrams``
    UDP datagrams one way), plus ``rtt_ms`` (median connect time)."""
    me = [sys.executable, os.path.abspath(__file__)]
    server = link.popen(
        "b",
        [*me, "_probe_server", "--host", link.addr_b, "--seconds", str(timeout_s)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        if server.stdout.readline().strip() != "ready":
            raise WanError("probe server did not start")
        done = link.run(
            "a",
            [
                *me,
                "_probe_client",
                "--host",
                link.addr_b,
                "--connects",
                str(connects),
                "--transfer-bytes",
                str(transfer_bytes),
                "--datagrams",
                str(datagrams),
            ],
            timeout=timeout_s,
        )
        if done.returncode != 0:
            raise WanError(f"probe client failed: {done.stderr.strip()}")
        result = json.loads(done.stdout)
    finally:
        _stop(server, grace_s=1.0)
    if result["connect_rtt_ms"]:
        result["rtt_ms"] = statistics.median(result["connect_rtt_ms"])
    return result


# -- CLI --------------------------------------------------------------------------------------


def _spec_from(args: argparse.Namespace) -> LinkSpec:
    return LinkSpec(
        rate_mbit=args.rate_mbit,
        rtt_ms=args.rtt_ms,
        jitter_ms=args.jitter_ms,
        loss=args.loss,
        mtu=args.mtu,
        queue_bytes=args.queue_bytes,
    )


def _link_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--rate-mbit", type=float, default=1000.0, help="bottleneck rate (0: unlimited)")
    ap.add_argument("--rtt-ms", type=float, default=40.0)
    ap.add_argument("--jitter-ms", type=float, default=0.0)
    ap.add_argument("--loss", type=float, default=0.0, help="drop probability per packet and direction")
    ap.add_argument("--mtu", type=int, default=9000)
    ap.add_argument("--queue-bytes", type=int, default=None, help="bottleneck buffer (default: one BDP)")
    ap.add_argument("--cc", default=None, help="congestion control in both namespaces (reno, bbr)")
    ap.add_argument("--tcp-buffer-max-bytes", type=int, default=32 << 20)


def _raise_on_sigterm() -> None:
    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    hidden = {"_relay": _relay, "_probe_server": _probe_server, "_probe_client": _probe_client}
    if argv and argv[0] in hidden:
        ap = argparse.ArgumentParser()
        for flag, kind in (
            ("--fd-in", int),
            ("--fd-out", int),
            ("--delay-s", float),
            ("--jitter-s", float),
            ("--loss", float),
            ("--rate-bps", float),
            ("--queue-bytes", int),
            ("--mtu", int),
            ("--seed", int),
            ("--parent", int),
            ("--host", str),
            ("--seconds", float),
            ("--connects", int),
            ("--transfer-bytes", int),
            ("--datagrams", int),
        ):
            ap.add_argument(flag, type=kind)
        ap.add_argument("--namespaces", nargs="*", default=())
        hidden[argv[0]](ap.parse_args(argv[1:]))
        return 0

    command = []
    if "--" in argv:
        split = argv.index("--")
        argv, command = argv[:split], argv[split + 1 :]
    ap = argparse.ArgumentParser(
        prog="python -m perf.wanlink", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "action",
        nargs="?",
        choices=["up", "check", "cleanup"],
        default="up",
        help="up: hold the link (or run the command after --); check: measure it; cleanup: stale namespaces",
    )
    _link_arguments(ap)
    ap.add_argument("--side", choices=["a", "b"], default="a", help="where the command after -- runs")
    ap.add_argument("--seconds", type=float, default=None, help="up: hold the link this long (default: until Ctrl-C)")
    ap.add_argument("--check-bytes", type=int, default=64 << 20, help="check: bytes of the rate measurement")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if args.action == "cleanup":
        print(json.dumps({"removed": cleanup_stale()}))
        return 0
    _raise_on_sigterm()
    try:
        with WanLink(
            _spec_from(args), congestion_control=args.cc, tcp_buffer_max_bytes=args.tcp_buffer_max_bytes
        ) as link:
            if args.action == "check":
                cpu0, t0 = link.relay_cpu_seconds(), time.monotonic()
                result = measure(link, transfer_bytes=args.check_bytes, datagrams=2000 if link.spec.loss else 0)
                cpu = (link.relay_cpu_seconds() - cpu0) / (time.monotonic() - t0)
                result.update(spec=asdict(link.spec), cc=args.cc, relay_cpu_cores=round(cpu, 3))
                print(json.dumps(result))
                return 0
            if command:
                return subprocess.run(link.command(args.side, command), check=False).returncode
            print(
                json.dumps(
                    {
                        "namespaces": link.namespaces,
                        "addr_a": link.addr_a,
                        "addr_b": link.addr_b,
                        "spec": asdict(link.spec),
                        "cc": args.cc,
                    }
                ),
                flush=True,
            )
            print(
                f"run inside with: ip netns exec {link.namespaces['a']} CMD   (b: {link.namespaces['b']}); "
                "Ctrl-C removes the link",
                file=sys.stderr,
                flush=True,
            )
            end = None if args.seconds is None else time.monotonic() + args.seconds
            while end is None or time.monotonic() < end:
                time.sleep(0.2 if end is None else max(0.0, min(0.2, end - time.monotonic())))
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
