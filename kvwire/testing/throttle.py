"""A bandwidth-limited TCP relay on loopback: a slow link for tests, no root needed.

Forwards each connection's sender-to-receiver bytes through one token bucket shared by
all connections (``rate_bytes_per_s``, bursts up to ``burst_bytes``), so many streams
together get the link's rate, as on a real bottleneck. The reverse direction (acks) is
not limited. For delay, loss and real TCP dynamics use kvwire.testing.wan (root).
"""

from __future__ import annotations

import socket
import threading
import time


class ThrottledRelay:
    def __init__(self, target: str, rate_bytes_per_s: float, burst_bytes: int = 64 << 10):
        if rate_bytes_per_s <= 0 or burst_bytes <= 0:
            raise ValueError(f"need rate_bytes_per_s > 0 and burst_bytes > 0, got {rate_bytes_per_s}, {burst_bytes}")
        host, port = target.rsplit(":", 1)
        self._target = (host, int(port))
        self.rate = float(rate_bytes_per_s)
        self.burst = burst_bytes
        self._tokens = float(burst_bytes)
        self._stamp = time.monotonic()
        self._bucket = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._server.getsockname()[1]}"
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self.bytes_forwarded = 0
        threading.Thread(target=self._accept, daemon=True, name="throttle-accept").start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self._target)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _take(self, num_bytes: int) -> None:
        """Block until the shared bucket holds ``num_bytes`` tokens, then spend them."""
        while True:
            with self._bucket:
                now = time.monotonic()
                self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
                self._stamp = now
                if self._tokens >= num_bytes:
                    self._tokens -= num_bytes
                    self.bytes_forwarded += num_bytes
                    return
                wait = (num_bytes - self._tokens) / self.rate
            time.sleep(wait)

    def _pump(self, src: socket.socket, dst: socket.socket, limited: bool) -> None:
        chunk = min(16 << 10, self.burst)
        try:
            while True:
                data = src.recv(chunk)
                if not data:
                    break
                if limited:
                    self._take(len(data))
                dst.sendall(data)
        except OSError:
            pass
        for sock in (src, dst):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self._server.close()
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            sock.close()

    def __enter__(self) -> ThrottledRelay:  # noqa: PYI034 - Python 3.10 has no typing.Self
        return self

    def __exit__(self, *exc) -> None:
        self.close()
