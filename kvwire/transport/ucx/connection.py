"""One kvwire byte stream over a UCX endpoint: sends as control plus tag messages, receives
straight into the caller's memory, and a liveness socket that tells when the peer is gone.

Why it is long: sending, receiving and failing share one endpoint, its sequence numbers
and its locks (a failure must cancel both directions' requests and keep their buffers
alive); split, each part would reach into the others' state.
"""

from __future__ import annotations

import collections
import logging
import socket
import threading
import time
from collections.abc import Sequence

import numpy as np

from ... import device, native
from ...errors import KVWireError, PeerLostError, RemoteProtocolError, TransferTimeout, again, remembered
from ..base import Capabilities, LinkStats, UcxOptions
from . import control
from .hub import Hub
from .library import map_error

log = logging.getLogger(__name__)

_MAX_STAGING_BYTES = 1 << 30
_CLOSE_GRACE_S = 0.25  # how long a failing connection waits for UCX to let go of buffers (see _fail)
_POST_NOW_BYTES = 4096  # the most a ``send_now`` posts: control messages, not layers


class UcxConnection:
    """One byte stream over a UCX endpoint (the framing: kvwire.transport.ucx and .control)."""

    def __init__(
        self,
        hub: Hub,
        sock: socket.socket,
        ep,
        peer: str,
        *,
        send_prefix: int,
        recv_prefix: int,
        local: bool,
        options: UcxOptions,
        shared_fabrics: tuple[str, ...] = (),
    ):
        self.peer = peer
        self.transport = "ucx-local" if local else "ucx-net"
        # default_streams=1: UCX stripes one endpoint over its own lanes (multi-rail), and one
        # worker per process carries every connection: more connections only add threads
        # handing the worker to each other (slower at every size: perf/README.md,
        # "Measurements behind the code"). CUDA memory goes as is where UCX opened cuda_copy (a GPU is
        # there; cuda_ipc and GPUDirect RDMA where available), or, under numba's simulator,
        # where device memory is host memory.
        self.capabilities = Capabilities("ucx", device_memory=hub.takes_device_memory, default_streams=1,
                                         fabrics=shared_fabrics, shared_memory=local, nonblocking=True)
        self._hub = hub
        self._sock = sock
        self._ep = ep
        self._send_prefix = send_prefix << 32
        self._recv_prefix = recv_prefix << 32
        self._send_seq = 0
        self._recv_seq = 0
        self._send_lock = threading.Lock()
        self._recv_lock = threading.Lock()
        self._post_lock = threading.Lock()  # posting and closing the endpoint never overlap
        self._segments: collections.deque = collections.deque()  # memoryview (inline bytes) or int (bulk length)
        self._ctrl_req = None
        self._ctrl_bufs = [np.zeros(control.CTRL_BYTES, dtype=np.uint8) for _ in range(2)]
        self._ctrl_arrays = {id(b): hub.Array(b) for b in self._ctrl_bufs}
        self._ctrl_buf: np.ndarray | None = None
        self._timeout_s: float | None = None
        self._closed = False
        self._peer_gone = False
        self._error: KVWireError | None = None
        self._ep_closed = False
        self._inline_bytes = options.inline_bytes
        self._window_bytes = options.send_window_bytes
        self._inflight: collections.deque = collections.deque()  # (requests, buffers, bytes) of sends
        self._inflight_bytes = 0
        self.window_waits = 0  # times a send waited for the peer to take earlier ones (it reads slower than we send)
        self._recvs: list = []  # (request, sequence number) of receives posted and maybe pending
        self.liveness_fd = sock.fileno()  # (the hub watches it: Watched)
        hub.watch(self)

    # -- Connection interface ------------------------------------------------------------

    def send(self, buffers: Sequence) -> None:
        """Write all buffers in order: small ones inline in a control message, large ones as is."""
        with self._send_lock:
            self._check()
            self._post(buffers)
            self._reap(self._window_bytes)

    def send_now(self, buffers: Sequence) -> list:
        """Post a few control messages (a request's Open), as ``send`` does, from the
        engine's thread without waking the stream's writer (posting never waits for the
        peer); anything larger, or with the window full, comes back whole, for the writer.
        Each send is one message that the receiver takes on its own, so layers go to the
        writer, which joins those queued together into one (posted one by one, layers
        handed over back to back cost the receiver ~150 us of CPU a message more)."""
        with self._send_lock:
            self._check()
            error = self._pop_completed()
            if error is not None or self._inflight_bytes > self._window_bytes or not _small(buffers):
                return list(buffers)  # (``send`` waits, or reports the failed send)
            self._post(buffers)
            return []

    def _post(self, buffers: Sequence) -> None:
        """Post ``buffers`` as control and tag messages, and keep them until UCX is done
        with them. Under ``_send_lock``."""
        requests, keep = [], []
        segments, inline, inline_bytes = [], [], 0
        bulks = []
        for buf in buffers:
            if device.is_device(buf):
                nbytes = self._hub.Array(buf).nbytes
                view = buf
            else:
                view = _host_view(buf)
                nbytes = view.nbytes
            if not nbytes:
                continue
            if not device.is_device(view) and nbytes < self._inline_bytes:
                if inline_bytes + nbytes > control.INLINE_ROOM or len(segments) >= control.MAX_SEGMENTS:
                    self._post_group(segments, inline, bulks, requests, keep)
                    segments, inline, inline_bytes, bulks = [], [], 0, []
                segments.append(nbytes)
                inline.append(view)
                inline_bytes += nbytes
            else:
                if len(segments) >= control.MAX_SEGMENTS:
                    self._post_group(segments, inline, bulks, requests, keep)
                    segments, inline, inline_bytes, bulks = [], [], 0, []
                segments.append(-nbytes)
                bulks.append(view)
        if segments:
            self._post_group(segments, inline, bulks, requests, keep)
        nbytes = sum(a.nbytes for a in keep)
        self._inflight.append((requests, keep, nbytes))
        self._inflight_bytes += nbytes
        self._hub.sending.add(self)

    def _reap(self, limit_bytes: int) -> None:
        """Forget completed sends; wait for the oldest while the sends *before* the newest
        hold more than ``limit_bytes`` (with a limit of 0, until all of them are taken).

        Sends return before their large messages are taken (so the next chunk is on its way
        while the peer receives this one); the buffers stay referenced here until UCX is
        done with them. kvwire's Sender never reuses a buffer before the receiver acks it.
        The newest send never counts against the window: a chunk larger than the window
        (64 MiB CUDA chunks against a 16 MiB window) would otherwise make every send wait
        for its own completion, and the sender could not prepare (checksum) the next chunk
        while the peer receives this one.
        """
        while True:
            error = self._pop_completed()
            if error is not None:
                requests, keep, _ = self._inflight[0]
                raise self._fail(map_error(error, self.peer), requests, keep) from None
            if not self._inflight:
                return
            newest = self._inflight[-1][2] if limit_bytes else 0
            if self._inflight_bytes - newest <= limit_bytes:
                return
            if limit_bytes:
                self.window_waits += 1
            self._wait(*self._inflight[0][:2])

    def _pop_completed(self) -> BaseException | None:
        """Forget the sends at the head that UCX has finished with; the error of the first
        one that failed (left in place), if any. Under ``_send_lock``."""
        while self._inflight and all(r.completed for r in self._inflight[0][0]):
            requests, _, nbytes = self._inflight[0]
            try:
                for r in requests:
                    r.check_error()
            except Exception as exc:  # noqa: BLE001 - any UCX failure; the caller decides
                return exc
            self._inflight.popleft()
            self._inflight_bytes -= nbytes
        return None

    def forget_sent(self) -> None:
        """Let go of the buffers of sends UCX has finished with (``send`` does so on its next
        call; the hub calls this after progressing the worker, so a connection that goes
        idle does not keep the last request's arrays, borrowed only until finish(), alive).
        A failed send is left for ``send`` to report."""
        if self._closed:  # what UCX may still touch stays in _inflight (or the hub's zombies, see _fail)
            self._hub.sending.discard(self)
            return
        if not self._send_lock.acquire(blocking=False):
            return  # send() holds it, and reaps
        try:
            if self._closed:  # _fail gathers what is in flight without this lock
                return
            self._pop_completed()  # a failed send stays, for send() to report
            if not self._inflight:
                self._hub.sending.discard(self)
        finally:
            self._send_lock.release()

    def recv_into(self, view) -> None:
        """Fill ``view`` exactly; large messages are received straight into it."""
        if not device.is_device(view):
            return self.recv_into_many([view])
        view = device.device_bytes(view, writable=True)[0]  # flat bytes: offsets slice it
        total = self._hub.Array(view).nbytes
        with self._recv_lock:
            self._check()
            pos = 0
            while pos < total:
                if not self._segments:
                    self._next_control()
                    continue
                head = self._segments[0]
                if isinstance(head, memoryview):
                    take = min(len(head), total - pos)
                    device.copy(view[pos : pos + take], head[:take])  # the few inline bytes
                    if take == len(head):
                        self._segments.popleft()
                    else:
                        self._segments[0] = head[take:]
                    pos += take
                elif head <= total - pos:
                    pos = self._recv_bulks(view, pos, total)
                else:
                    self._stage(head)

    def recv_into_many(self, buffers: Sequence) -> None:
        """Fill each host buffer exactly, in order: the buffers an inline segment covers
        whole take their bytes in one call (``kvwire.native.scatter``, not one slice copy
        and one ``recv_into`` each: a small request's layers are a dozen or more inline
        tensors), large messages land straight in the buffer they fill."""
        views = [_host_view(buffer) for buffer in buffers]
        with self._recv_lock:
            self._check()
            index, pos = 0, 0  # the buffer being filled, and how far
            while index < len(views):
                view = views[index]
                if pos == len(view):
                    index, pos = index + 1, 0
                    continue
                if not self._segments:
                    self._next_control()
                    continue
                head = self._segments[0]
                if not isinstance(head, memoryview):
                    if head <= len(view) - pos:
                        pos = self._recv_bulks(view, pos, len(view))
                    else:
                        self._stage(head)
                    continue
                end, covered = index, 0
                if not pos:
                    while end < len(views) and covered + len(views[end]) <= len(head):
                        covered += len(views[end])
                        end += 1
                if end - index > 1:
                    native.scatter(head[:covered], views[index:end])
                    index, take = end, covered
                else:
                    take = min(len(head), len(view) - pos)
                    view[pos : pos + take] = head[:take]
                    pos += take
                if take == len(head):
                    self._segments.popleft()
                else:
                    self._segments[0] = head[take:]

    def set_timeout(self, seconds: float | None) -> None:
        self._timeout_s = seconds

    def link_stats(self) -> LinkStats | None:
        return None

    def close(self) -> None:
        """Close now; threads waiting in send/recv_into wake with PeerLostError."""
        self._closed = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes our waiters (their epoll sees it) and tells the peer
        except OSError:
            pass
        self._close_endpoint()

    # -- sending ---------------------------------------------------------------------------

    def _tag(self, prefix: int, seq: int):
        return self._hub.api.UCXXTag(prefix | (seq & 0xFFFFFFFF))

    def _post_group(self, segments, inline, bulks, requests, keep) -> None:
        posts = [np.frombuffer(control.encode(segments, inline), dtype=np.uint8)]
        posts.extend(bulks)
        try:
            with self._post_lock:
                self._check()
                for item in posts:
                    array = self._hub.Array(item)
                    keep.append(array)
                    with self._hub.lock:
                        requests.append(self._ep.tag_send(array, self._tag(self._send_prefix, self._send_seq)))
                    self._send_seq += 1
        except Exception as exc:  # noqa: BLE001
            raise self._fail(map_error(exc, self.peer), requests, keep) from None

    # -- receiving -------------------------------------------------------------------------

    def _post_control(self) -> None:
        # Two control buffers take turns: when the next control message is needed, every
        # inline segment of the one before it has been consumed.
        self._ctrl_bufs.reverse()
        self._ctrl_buf = self._ctrl_bufs[0]
        self._ctrl_req = self._post_recv(self._ctrl_arrays[id(self._ctrl_buf)], self._recv_seq)
        self._recv_seq += 1

    def _post_recv(self, array, seq: int):
        try:
            with self._post_lock:
                self._check()
                if len(self._recvs) > 64:
                    self._recvs = [pair for pair in self._recvs if not pair[0].completed]
                with self._hub.lock:
                    request = self._ep.tag_recv(array, self._tag(self._recv_prefix, seq))
                self._recvs.append((request, seq))
                return request
        except Exception as exc:  # noqa: BLE001
            raise self._fail(map_error(exc, self.peer), [], []) from None

    def _next_control(self) -> None:
        if self._ctrl_req is None:
            self._post_control()
        buf, req = self._ctrl_buf, self._ctrl_req
        self._wait([req], [buf])
        self._check()  # completed by close() (see _close_endpoint), not by the peer
        self._ctrl_req = None
        try:
            segments, num_bulks = control.decode(buf)
        except control.ControlError as exc:
            raise self._fail(RemoteProtocolError(f"UCX control message from {self.peer} {exc}"), [], []) from None
        self._segments.extend(segments)
        # Bulk messages take the sequence numbers after their control message; the next
        # control message's receive is posted now, so it lands without a wait.
        self._bulk_seq = self._recv_seq
        self._recv_seq += num_bulks
        self._post_control()

    def _recv_bulks(self, view, pos: int, total: int) -> int:
        """Post receives for the consecutive large messages that fit in ``view``; wait for all."""
        requests, keep = [], []
        while self._segments and isinstance(self._segments[0], int) and self._segments[0] <= total - pos:
            length = self._segments.popleft()
            array = self._hub.Array(view[pos : pos + length])
            keep.append(array)
            requests.append(self._post_recv(array, self._bulk_seq))
            self._bulk_seq += 1
            pos += length
        self._wait(requests, keep)
        self._check()  # completed by close() (see _close_endpoint), not by the peer
        return pos

    def _stage(self, length: int) -> None:
        """A large message longer than what the caller reads now: receive it aside."""
        if length > _MAX_STAGING_BYTES:
            raise self._fail(RemoteProtocolError(f"UCX message of {length} bytes from {self.peer} exceeds the limit"), [], [])
        staging = np.empty(length, dtype=np.uint8)
        self._segments.popleft()
        self._segments.appendleft(length)  # _recv_bulks pops it again
        self._recv_bulks(memoryview(staging), 0, length)
        self._segments.appendleft(memoryview(staging))

    # -- waiting, failure, close -----------------------------------------------------------

    def _check(self) -> None:
        if self._error is not None:
            raise again(self._error)
        if self._closed:
            raise PeerLostError(f"UCX connection to {self.peer} was closed")

    def _wait(self, requests: list, keep: list) -> None:
        """Until ``requests`` complete (this thread may progress the worker for everyone), or fail."""
        deadline = None if self._timeout_s is None else time.monotonic() + self._timeout_s
        try:
            self._hub.wait(self, requests, deadline)
        except Exception as exc:  # noqa: BLE001 - UCX errors and ours alike end the connection
            raise self._fail(map_error(exc, self.peer), requests, keep) from None

    def raise_if_broken(self, deadline: float | None) -> None:
        if self._closed:
            raise PeerLostError(f"UCX connection to {self.peer} was closed")
        if self._peer_gone:
            raise PeerLostError(f"UCX connection to {self.peer} closed by the peer")
        if deadline is not None and time.monotonic() >= deadline:
            raise TransferTimeout(f"UCX connection to {self.peer} timed out")

    def check_liveness(self) -> None:
        """The liveness socket is readable: the peer closed it, died, or we shut it down."""
        try:
            data = self._sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._peer_gone = True  # the next loop progresses once more first: data sent before the close still counts
            self._hub.unwatch(
                self, self.liveness_fd
            )  # a closed socket stays readable: epoll would return at once, forever

    def _fail(self, error: KVWireError, requests: list, keep: list) -> KVWireError:
        """Break the connection and make sure UCX no longer touches the caller's buffers."""
        if self._error is None:
            closed = PeerLostError(f"UCX connection to {self.peer} was closed")
            self._error = remembered(error if not self._closed else closed)
        self._closed = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._close_endpoint()
        for pending, buffers, _ in tuple(self._inflight):  # (the hub's forget_sent may pop meanwhile)
            requests, keep = requests + pending, keep + buffers
        try:  # progress through the hub: two threads progressing one worker at once crash ucxx
            self._hub.wait(None, requests, time.monotonic() + _CLOSE_GRACE_S)
        except Exception:  # noqa: BLE001, S110 - canceled requests complete with errors; a timeout is handled below
            pass
        if not all(r.completed for r in requests):
            log.warning("UCX requests to %s did not cancel; keeping their buffers alive", self.peer)
            self._hub.keep_until_done(requests, keep)
        return again(self._error)  # raised by each caller: a copy, or each raise would chain its frames to it

    def _close_endpoint(self) -> None:
        with self._post_lock:
            if self._ep_closed:
                return
            self._ep_closed = True
            try:
                with self._hub.lock:
                    if self.transport == "ucx-net":
                        # Error handling on: a forced close, which cancels this endpoint's
                        # requests first and never waits on the peer. (ep.close() here
                        # crashed ucxx with SIGSEGV once the peer had died.)
                        self._ep.close_blocking()
                    else:
                        self._ep.close()
            except Exception as exc:  # noqa: BLE001
                log.debug("closing the UCX endpoint to %s: %s", self.peer, exc)
            # ep.close() flushes before it cancels this endpoint's requests, and over UCX's
            # shared-memory FIFOs that flush can wait forever while a receive is posted: the
            # pre-posted control receive would never complete and its thread (and buffer)
            # never be let go. Tag receives belong to the worker, so a message from the
            # worker to itself with the same tag completes each of them now; the waiters
            # then see the connection closed.
            for request, seq in self._recvs:
                if not request.completed:
                    self._hub.unblock(self._tag(self._recv_prefix, seq))
            self._recvs.clear()
        ctrl = self._ctrl_req
        if ctrl is not None and not ctrl.completed:
            self._hub.keep_until_done([ctrl], [self._ctrl_buf])
        self._hub.unwatch(self, self.liveness_fd)
        self._hub.sending.discard(self)  # (closed: forget_sent no longer applies)
        self._sock.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001, S110 - interpreter teardown: the process is going away
            pass


def _small(buffers: Sequence) -> bool:
    """Whether ``buffers`` are host memory of at most ``_POST_NOW_BYTES`` in all."""
    total = 0
    for buffer in buffers:
        if device.is_device(buffer):
            return False
        total += memoryview(buffer).nbytes
    return total <= _POST_NOW_BYTES


def _host_view(buffer) -> memoryview:
    view = memoryview(buffer)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")
