"""A TCP relay on loopback that injects faults on purpose: bit flips, cuts, stalls, a slow
link, and lost or late replies.

Put it between a Sender and a Receiver (``Sender(layout, relay.address)``) to see what
kvwire does when the network corrupts, drops, stalls or throttles bytes. Byte faults apply
to the sender-to-receiver direction of every relayed connection, counted in bytes; a rate
limit is one token bucket shared by all connections, as on a real bottleneck. Reply faults
read the receiver-to-sender direction frame by frame (kvwire's stream messages: Ack,
Abort) and drop or hold the ones a predicate picks, as a connection that died with them
or a slow return path would; ``replies`` lists every reply that went through. For delay,
loss and real TCP dynamics use perf.wanlink (root).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import KVWireError
from ..wire import framing


@dataclass
class Fault:
    """What to do to the sender's byte stream; offsets count bytes of one connection."""

    flip_bit_at: int | None = None  # xor 0x01 into this byte
    cut_at: int | None = None  # close both sides once this many bytes went through
    stall_at: int | None = None  # stop forwarding (but keep the sockets open) from here
    connections: int | None = None  # only the first this-many connections are faulty (None: all)
    rate_bytes_per_s: float | None = None  # forward at most this fast, all connections together
    drop_reply: Callable[[object], bool] | None = None  # a reply (Ack, Abort) for which this is True is lost
    delay_reply: Callable[[object], float] | None = None  # hold a reply (and those after it) this many seconds


class _TokenBucket:
    """Bytes may pass at ``rate`` per second, in bursts of up to ``burst``."""

    def __init__(self, rate: float, burst: int = 64 << 10):
        if rate <= 0:
            raise ValueError(f"rate_bytes_per_s must be > 0, got {rate}")
        self.rate, self.burst = float(rate), burst
        self._tokens, self._stamp = float(burst), time.monotonic()
        self._lock = threading.Lock()

    def take(self, num_bytes: int) -> None:
        """Block until ``num_bytes`` may pass (a piece larger than the burst waits for all of it)."""
        while True:
            with self._lock:
                now = time.monotonic()
                self._tokens = min(max(self.burst, num_bytes), self._tokens + (now - self._stamp) * self.rate)
                self._stamp = now
                if self._tokens >= num_bytes:
                    self._tokens -= num_bytes
                    return
                wait = (num_bytes - self._tokens) / self.rate
            time.sleep(wait)


def _hang_up(*socks: socket.socket) -> None:
    """End both directions of a relayed connection (the other pump then stops too)."""
    for sock in socks:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class FaultyRelay:
    def __init__(self, target: str, fault: Fault | None = None):
        host, port = target.rsplit(":", 1)
        self._target = (host, int(port))
        self.fault = fault or Fault()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._server.getsockname()[1]}"
        self._sockets: list[socket.socket] = []
        self.num_connections = 0
        self._lock = threading.Lock()
        self._closed = False
        self.stalled = threading.Event()
        self.fired = threading.Event()  # set once any fault was actually applied
        self.replies: list = []  # every reply forwarded, decoded, in order (with reply faults)
        self.dropped: list = []  # the replies dropped
        self._stop = threading.Event()
        self._bucket = _TokenBucket(self.fault.rate_bytes_per_s) if self.fault.rate_bytes_per_s else None
        threading.Thread(target=self._accept, daemon=True, name="relay-accept").start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self._target)
            except OSError:  # nothing behind the relay any more: hang up, as a proxy would
                client.close()
                continue
            with self._lock:
                self._sockets += [client, upstream]
                self.num_connections += 1
                faulty = self.fault.connections is None or self.num_connections <= self.fault.connections
            threading.Thread(target=self._pump, args=(client, upstream, faulty, self._bucket), daemon=True).start()
            replies = self._pump_replies if self.fault.drop_reply or self.fault.delay_reply else self._pump
            args = (upstream, client) if replies == self._pump_replies else (upstream, client, False, None)
            threading.Thread(target=replies, args=args, daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, faulty: bool, bucket: _TokenBucket | None) -> None:
        position = 0
        fault = self.fault
        try:
            while True:
                data = bytearray(src.recv(16384 if bucket else 65536))
                if not data:
                    break
                if bucket is not None:
                    bucket.take(len(data))
                if faulty:
                    end = position + len(data)
                    if fault.stall_at is not None and end > fault.stall_at:
                        dst.sendall(data[: max(0, fault.stall_at - position)])
                        self.stalled.set()
                        self.fired.set()
                        self._stop.wait()  # hold the connection open, forward nothing
                    if fault.flip_bit_at is not None and position <= fault.flip_bit_at < end:
                        data[fault.flip_bit_at - position] ^= 0x01
                        self.fired.set()
                    if fault.cut_at is not None and end >= fault.cut_at:
                        dst.sendall(data[: fault.cut_at - position])
                        self.fired.set()
                        break
                    position = end
                dst.sendall(data)
        except OSError:
            pass
        _hang_up(src, dst)

    def _pump_replies(self, src: socket.socket, dst: socket.socket) -> None:
        """Forward the receiver's frames one by one, dropping or holding those the fault
        picks; frames that are not stream messages (the handshake's) pass untouched."""
        pending = bytearray()
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                pending += data
                while len(pending) >= framing.PREFIX_BYTES:
                    (length,) = framing.PREFIX.unpack_from(pending)
                    end = framing.PREFIX_BYTES + length
                    if len(pending) < end:
                        break
                    frame, pending = bytes(pending[:end]), pending[end:]
                    if self._forward_reply(frame):
                        dst.sendall(frame)
        except OSError:
            pass
        _hang_up(src, dst)

    def _forward_reply(self, frame: bytes) -> bool:
        try:
            message = framing.decode_stream(frame[framing.PREFIX_BYTES:])
        except KVWireError:
            return True  # a handshake message
        fault = self.fault
        if fault.drop_reply is not None and fault.drop_reply(message):
            self.dropped.append(message)
            self.fired.set()
            return False
        if fault.delay_reply is not None and (hold := fault.delay_reply(message)) > 0:
            self.fired.set()
            self._stop.wait(hold)
        self.replies.append(message)
        return True

    def cut_now(self, connections: int | None = None) -> int:
        """Cut the first ``connections`` relayed connections (all: None) now, whatever their
        byte count, and keep accepting new ones; returns how many were cut. For links whose
        bytes do not pass through the relay (UCX's data path) this kills the TCP side only."""
        with self._lock:
            pairs = [self._sockets[i : i + 2] for i in range(0, len(self._sockets), 2)]
        cut = 0
        for pair in pairs[:connections]:
            _hang_up(*pair)
            cut += 1
        if cut:
            self.fired.set()
        return cut

    def close(self) -> None:
        self._stop.set()
        self._server.close()
        with self._lock:
            _hang_up(*self._sockets)
            for sock in self._sockets:
                sock.close()

    def __enter__(self) -> "FaultyRelay":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
