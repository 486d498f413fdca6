"""UCX backend over ucxx: kvwire's byte stream carried by UCX tag messages.

Why it looks the way it does:

- **Bootstrap over TCP.** ``listen("HOST:PORT")`` opens a plain TCP port. A client connects,
  both sides swap their UCX worker addresses (msgspec, bounded), create an endpoint to the
  other's worker, and ping each other over UCX before the connection is handed up. The TCP
  socket then stays open, idle, as the *liveness channel*: the kernel closes it when the
  peer process dies, which wakes any thread waiting on UCX (see "shared memory").
- **Error handling on; shared memory only when asked for.** By default every endpoint runs
  with UCX error handling ("peer"): UCX reports a dead peer itself and its errors
  (connection reset, endpoint timeout) are mapped. In that mode UCX refuses sm/posix/cma, so
  on one host the bytes go over UCX's tcp transport (RDMA across hosts where there is some).
  ``UcxOptions(shared_memory=True)`` on both sides gives peers on the same host (same
  hostname, boot id and pid namespace) endpoints *without* error handling, so UCX may use
  shared memory / CMA / cuda_ipc (several times the loopback throughput), and a peer's death
  is seen through the liveness socket. It is not the default because UCX does not survive a
  peer killed mid-transfer on such endpoints (found by ``perf.soak --backend ucx``): a CMA
  read from the dead process is a FATAL UCX error, i.e. ``abort()`` of this process, and a
  writer killed inside this process's shared-memory FIFO leaves the FIFO stuck for every
  later peer. Opt in where peers live and die together (one job, one failure domain).
- **Byte stream over tag messages.** Each ``send(buffers)`` becomes one small control
  message (buffers under ``inline_bytes`` copied into it, and the lengths of the others)
  followed by one tag message per large buffer, sent straight from the caller's memory
  (UCX rendezvous: CMA on one host, zero-copy on RDMA, GPU memory as is). ``send`` returns
  while its own messages and up to ``send_window_bytes`` of earlier ones are still in
  flight (as a TCP send returns once the kernel holds the bytes), keeping the buffers
  referenced until UCX is done. The receiver posts each large message's receive straight
  into the destination ``recv_into`` was given, so bulk bytes land in place with no
  Python copy. Tags are ``(connection id << 32) | sequence number``, so many connections
  share one worker.
- **Threads drive progress.** One UCX worker per process, progressed by whichever thread
  is waiting on it (no ucxx progress thread, no event loop: faster on loopback, perf/README.md
  "Measurements behind the code"). One waiting thread at a time leads: it blocks in epoll
  (GIL released) on the worker's event fd, every connection's liveness socket and a kick
  eventfd, progresses the worker and wakes the others; nothing spins while idle. While no
  thread waits, one idle daemon thread leads the same way, so UCX still closes the sockets
  of departed peers. Every call into ucxx holds one lock (``_Hub.lock``): ucxx crashed when
  an endpoint was closed while another thread progressed the worker.
- **Peer death without error handling.** A waiter learns of it from the liveness socket
  (EOF or reset) after one more progress, so bytes the peer sent before dying still count;
  on any failure the endpoint is closed (a forced close that cancels its requests first
  with error handling; otherwise each posted receive is completed by a message from the
  worker to itself, since a flushing close can wait on it forever) and ``recv_into`` /
  ``send`` return once UCX has let go of the caller's buffers (or, if UCX has not within
  ``_CLOSE_GRACE_S``, those buffers are kept referenced forever rather than reused).

All UCX errors become kvwire errors in ``_map_error`` and nowhere else.

Why it is long: options, fabric discovery, the progress hub, bootstrap, control-message
framing, connection and listener are still one file; redesign stage 5 (issue 36) splits
them into a ``transport/ucx/`` package.
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
import re
import select
import socket
import struct
import threading
import time
from collections.abc import Sequence
from typing import Annotated

import msgspec
import numpy as np

from .. import device
from ..address import parse_address
from ..errors import KVWireError, PeerLostError, RemoteProtocolError, TransferTimeout, again, remembered
from .base import Capabilities, LinkStats, TcpOptions, UcxOptions, check_options
from .sockets import ListeningSocket, configure_socket, dial

log = logging.getLogger(__name__)

MAGIC = b"\x00\x00\x00\x00kvwire-ucx/1"  # a zero TCP frame length: a TCP-only receiver refuses it at once
_HELLO_LIMIT_BYTES = 64 * 1024
_CTRL_BYTES = 256 * 1024
_MAX_SEGMENTS = 4096
_MAX_STAGING_BYTES = 1 << 30
_SEGMENT = struct.Struct("<I")
_IDLE_WAIT_S = 0.1  # the longest a waiter sleeps before re-checking its deadline and flags
_IDLE_PROGRESS_S = 1.0  # the idle thread's longest sleep (UCX events and kicks wake it sooner)
_IDLE_AFTER_S = 0.05  # the idle thread leads only once no thread has waited for this long (and checks this often)
_CLOSE_GRACE_S = 0.25  # how long a failing connection waits for UCX to let go of buffers (see _fail)
_UNBLOCK = b"\xff\xff\xff\xff"  # what unblock() sends: a control message no peer may send (too many segments)


class _Hello(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    worker_address: bytes
    host_id: str
    tag_prefix: int
    shared_memory: bool
    fabrics: Annotated[list[Annotated[str, msgspec.Meta(max_length=64)]], msgspec.Meta(max_length=64)] = []


_hello_decoder = msgspec.msgpack.Decoder(_Hello)


# UCX settings kvwire changes from UCX's own defaults, each unless the user sets it or a
# setting it depends on (in the environment or ``UcxOptions.ucx_config``).
# TCP_TX_SEG_SIZE: UCX's tcp transport sends in 8 KiB segments by default; 64 KiB (its
# receive segment, so receive-side memory is unchanged, and a larger send segment than
# receive segment is refused) moves several times the bytes over UCX's tcp transport
# (perf/README.md, "Measurements behind the code").
_TUNED_DEFAULTS = {"TCP_TX_SEG_SIZE": ("64k", ("TCP_TX_SEG_SIZE", "TCP_RX_SEG_SIZE"))}


def tuned_defaults(ucx_config: Sequence[tuple[str, str]] = ()) -> dict[str, str]:
    """kvwire's defaults for the UCX context's settings the user has left alone."""
    given = {name for name, _ in ucx_config} | {name[4:] for name in os.environ if name.startswith("UCX_")}
    return {name: value for name, (value, depends) in _TUNED_DEFAULTS.items() if not given.intersection(depends)}


# -- errors -----------------------------------------------------------------------------


def _map_error(exc: BaseException, peer: str) -> KVWireError:
    """The one place where UCX errors become kvwire errors."""
    if isinstance(exc, KVWireError):
        return exc
    api = _ucxx()[0]
    if isinstance(exc, (api.UCXEndpointTimeoutError, api.UCXTimedOutError)):
        return TransferTimeout(f"UCX connection to {peer} timed out: {exc}")
    if isinstance(exc, api.UCXMessageTruncatedError):
        return RemoteProtocolError(f"UCX message from {peer} larger than announced: {exc}")
    if isinstance(exc, api.UCXCanceledError):
        return PeerLostError(f"UCX connection to {peer} was closed")
    return PeerLostError(f"UCX connection to {peer} lost: {type(exc).__name__}: {exc}")


# UCX transports that stay inside one host, or that UCX runs over plain sockets.
_NOT_FABRICS = frozenset(
    {"self", "tcp", "sysv", "posix", "cma", "knem", "xpmem", "cuda_copy", "cuda_ipc", "gdr_copy"}
    | {"rocm_copy", "rocm_ipc", "rocm_gdr", "ze_copy", "ze_ipc"}
)
_RESOURCE = re.compile(r"resource\s+\d+\s*:.*flags\s+\S+\s+([\w.]+)/")


def context_transports(context_info: str) -> set[str]:
    """The transports in a UCX context's resource list (tcp, cma, cuda_copy, rc, ...)."""
    return {m.group(1) for m in _RESOURCE.finditer(context_info)}


def fabric_transports(context_info: str) -> list[str]:
    """The fabric transports (RDMA: rc, ud, dc, ...) in a UCX context's resource list."""
    return sorted(context_transports(context_info) - _NOT_FABRICS)


def fabrics(options: UcxOptions | None = None) -> list[str]:
    """This process's UCX fabric transports (starting its UCX context if need be)."""
    return _Hub.get(options or UcxOptions()).fabrics


def local_capabilities(options: UcxOptions | None = None) -> Capabilities:
    """What UCX offers from this process before any peer is known: whether it takes CUDA
    memory, its fabric transports, and whether shared memory is offered to a peer on this
    host. Starts the process's UCX context; raises where UCX cannot start."""
    options = options or UcxOptions()
    hub = _Hub.get(options)
    return Capabilities("ucx", device_memory=hub.takes_device_memory, default_streams=1,
                        fabrics=tuple(hub.fabrics), shared_memory=options.shared_memory)


def ucx_available() -> bool:
    """Whether ucxx can be imported here (it is an optional dependency: the ``ucx`` extra)."""
    try:
        _ucxx()
    except ImportError:
        return False
    return True


def _ucxx():
    # UCX writes its log (errors such as a dead peer's reset connection) to stdout by
    # default, i.e. into the application's own output (the soak's JSON lines broke on it).
    os.environ.setdefault("UCX_LOG_FILE", "stderr")
    try:
        import ucxx._lib.libucxx as api
        from ucxx._lib.arr import Array
    except ImportError as exc:
        raise ImportError(f"the ucx backend needs ucxx (pip install 'kvwire[ucx]'): {exc}") from exc
    return api, Array


# -- the process's UCX worker -----------------------------------------------------------


def _host_id() -> str:
    """Equal for two processes that can share memory: hostname, boot id, pid namespace."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = "?"
    try:
        pidns = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        pidns = 0
    return f"{socket.gethostname()}/{boot}/{pidns}"


class _Hub:
    """The process's UCX context and worker, shared by every connection."""

    _instance: _Hub | None = None
    _lock = threading.Lock()

    def __init__(self, options: UcxOptions):
        self.api, self.Array = _ucxx()
        # ucxx writes UCX_* variables into os.environ when imported; UCX would then warn
        # about those this machine does not use (no CUDA), which is noise for our users.
        config = {"WARN_UNUSED_ENV_VARS": "n", **dict(options.ucx_config)}
        tuned = tuned_defaults(options.ucx_config)
        try:
            self.context, self.worker = self._start(tuned | config)
        except Exception as exc:  # e.g. a ucx.conf whose TCP_RX_SEG_SIZE is under kvwire's TX segment
            if not tuned:
                raise
            log.info("UCX refused kvwire's defaults %s (%s); starting with UCX's own", tuned, exc)
            self.context, self.worker = self._start(config)
        # Every call into ucxx (progress, arm, post, endpoint create/close) holds this lock:
        # ucxx crashed (SIGSEGV) when one thread closed an endpoint, after its peer died,
        # while another progressed the worker. The leader drops it while it sleeps in epoll.
        self.lock = threading.RLock()
        self.worker.init_blocking_progress_mode()
        self.epoll_fd = self.worker.epoll_file_descriptor
        self.address = bytes(self.worker.address)
        self.host_id = _host_id()
        info = self.context.info
        # A UCX built with CUDA reports cuda_support on a machine without a GPU too; only
        # a device UCX can open (cuda_copy in its resources) means CUDA memory can go as is.
        self.cuda = bool(self.context.cuda_support) and "cuda_copy" in context_transports(info)
        self.fabrics = fabric_transports(info)
        self._ids = itertools.count(int.from_bytes(os.urandom(2), "little") << 16)
        self.cond = threading.Condition()
        self.leader: int | None = None
        self.kick_fd = os.eventfd(0, os.EFD_NONBLOCK)
        self.epoll = select.epoll()
        self.epoll.register(self.epoll_fd, select.EPOLLIN)
        self.epoll.register(self.kick_fd, select.EPOLLIN)
        self.watched: dict[int, UcxConnection] = {}
        self.sending: set[UcxConnection] = set()  # connections holding buffers of sends in flight
        self._id_lock = threading.Lock()
        self.zombies: list = []  # requests UCX would not cancel: their buffers must outlive them
        self._self_ep = None  # an endpoint to this worker itself, for unblock()
        self._unblocking: list = []
        self.waiting = 0  # threads inside wait()
        self.last_wait = time.monotonic()  # when a thread last left wait()
        threading.Thread(target=self._idle_loop, name="ucx-hub-idle", daemon=True).start()

    def _start(self, config: dict):
        context = self.api.UCXContext(config, feature_flags=(self.api.Feature.TAG, self.api.Feature.WAKEUP))
        return context, self.api.UCXWorker(context)

    @classmethod
    def get(cls, options: UcxOptions) -> _Hub:
        with cls._lock:
            if cls._instance is None:
                cls._instance = cls(options)
            return cls._instance

    def keep_until_done(self, requests: list, buffers: list) -> None:
        """Keep ``buffers`` referenced until UCX completes ``requests`` (forever if it never does)."""
        with self._id_lock:
            self.zombies = [(r, b) for r, b in self.zombies if not all(x.completed for x in r)]
            self.zombies.append((requests, buffers))

    def unblock(self, tag) -> None:
        """Complete this worker's receive posted with ``tag`` by sending it a message itself."""
        with self._id_lock:
            if self._self_ep is None:
                address = self.api.UCXAddress.create_from_buffer(self.address)
                with self.lock:
                    self._self_ep = self.api.UCXEndpoint.create_from_worker_address(self.worker, address, False)
            self._unblocking = [(r, b) for r, b in self._unblocking if not r.completed]
            buf = self.Array(np.frombuffer(_UNBLOCK, dtype=np.uint8))
            with self.lock:
                self._unblocking.append((self._self_ep.tag_send(buf, tag), buf))
        self.kick()

    @property
    def takes_device_memory(self) -> bool:
        """CUDA memory may go to UCX as is: it opened cuda_copy (a GPU is there), or, under
        numba's simulator, device memory is host memory."""
        return self.cuda or device.simulated()

    def new_prefix(self) -> int:
        with self._id_lock:
            return next(self._ids) & 0xFFFFFFFF

    def progress(self) -> None:
        with self.lock:
            self.worker.progress()

    # One waiting thread at a time (the leader) progresses the worker and blocks in epoll on
    # its event fd, every connection's liveness socket and a kick eventfd; the others wait
    # on a condition that the leader notifies after each round. No thread spins, and no
    # completion is missed because another thread happened to progress it.

    def watch(self, conn: UcxConnection) -> None:
        with self.cond:
            fd = conn._sock.fileno()
            self.epoll.register(fd, select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR)
            self.watched[fd] = conn

    def unwatch(self, conn: UcxConnection, fd: int) -> None:
        with self.cond:
            if self.watched.get(fd) is conn:
                del self.watched[fd]
                try:
                    self.epoll.unregister(fd)
                except OSError:
                    pass
            self.cond.notify_all()
        self.kick()

    def kick(self) -> None:
        """Wake the leader (new requests were posted, or a connection closed)."""
        if self.leader is not None and self.leader != threading.get_ident():
            os.eventfd_write(self.kick_fd, 1)

    def wait(self, conn: UcxConnection | None, requests: list, deadline: float | None) -> None:
        """Until ``requests`` complete; raises what ``conn._raise_if_broken`` raises, or (with
        no ``conn``) TransferTimeout at the deadline."""
        me = threading.get_ident()
        with self.cond:
            self.waiting += 1  # before the kick: an idle leader that wakes must not lead again
        self.kick()  # a leader blocked in epoll must progress what this thread just posted
        with self.cond:
            try:
                while True:
                    if all(r.completed for r in requests):
                        for r in requests:
                            r.check_error()
                        return
                    if conn is not None:
                        conn._raise_if_broken(deadline)
                    elif time.monotonic() >= deadline:
                        raise TransferTimeout("UCX requests did not complete in time")
                    if self.leader is None:
                        self.leader = me
                    if self.leader == me:
                        self.cond.release()
                        try:
                            self._round(requests, self._slice(deadline))
                        finally:
                            self.cond.acquire()
                        self.cond.notify_all()
                    else:
                        self.cond.wait(self._slice(deadline))
            finally:
                self.waiting -= 1
                self.last_wait = time.monotonic()
                if self.leader == me:
                    self.leader = None
                if self.leader is None:
                    self.cond.notify_all()

    def _idle_loop(self) -> None:
        """Progress the worker while no thread waits on it.

        Without this, a process whose connections are all closed never progresses UCX
        again, so UCX never sees its peers' sockets close: each departed peer's UCX tcp
        socket stayed open (CLOSE-WAIT) until the next transfer. This thread leads only
        while nobody else waits, and hands over as soon as a waiter kicks it.
        """
        me = threading.get_ident()
        while True:
            # It checks on a timer rather than waiting on ``cond``: woken by every notify of
            # a busy hub, it took the GIL from the threads moving data many times a message.
            time.sleep(_IDLE_AFTER_S)
            with self.cond:
                if self.leader is not None or self.waiting or time.monotonic() - self.last_wait < _IDLE_AFTER_S:
                    continue
                self.leader = me
            try:
                self._round([], _IDLE_PROGRESS_S)
            except Exception as exc:  # noqa: BLE001 - never let the idle thread die
                log.debug("UCX idle progress: %s", exc)
            finally:
                with self.cond:
                    self.leader = None
                    self.cond.notify_all()

    @staticmethod
    def _slice(deadline: float | None) -> float:
        if deadline is None:
            return _IDLE_WAIT_S
        return max(0.0, min(_IDLE_WAIT_S, deadline - time.monotonic()))

    def _round(self, requests: list, timeout: float) -> None:
        try:
            self._progress_and_wait(requests, timeout)
        finally:
            for conn in list(self.sending):
                conn._forget_sent()

    def _progress_and_wait(self, requests: list, timeout: float) -> None:
        with self.lock:
            self.worker.progress()  # (spinning here before sleeping measured slower on 2 busy cores)
            if (requests and all(r.completed for r in requests)) or not self.worker.arm():
                return
        for fd, _events in self.epoll.poll(timeout):
            if fd == self.kick_fd:
                try:
                    os.eventfd_read(self.kick_fd)
                except BlockingIOError:
                    pass
            elif fd != self.epoll_fd:
                conn = self.watched.get(fd)
                if conn is not None:
                    conn._check_socket()
        with self.lock:
            self.worker.progress()  # so data a peer sent before closing is in before anyone sees it gone


# -- bootstrap (over the liveness socket) -----------------------------------------------


def _send_hello(sock: socket.socket, hello: _Hello, *, with_magic: bool) -> None:
    body = msgspec.msgpack.encode(hello)
    sock.sendall((MAGIC if with_magic else b"") + struct.pack(">I", len(body)) + body)


def _recv_exact(sock: socket.socket, nbytes: int, peer: str) -> bytes:
    buf = bytearray(nbytes)
    view = memoryview(buf)
    while view:
        n = sock.recv_into(view)
        if n == 0:
            raise PeerLostError(f"{peer} closed the connection during the UCX bootstrap")
        view = view[n:]
    return bytes(buf)


def _recv_hello(sock: socket.socket, peer: str) -> _Hello:
    (length,) = struct.unpack(">I", _recv_exact(sock, 4, peer))
    if not 0 < length <= _HELLO_LIMIT_BYTES:
        raise RemoteProtocolError(f"UCX bootstrap from {peer}: hello of {length} bytes is outside 1..{_HELLO_LIMIT_BYTES}")
    try:
        return _hello_decoder.decode(_recv_exact(sock, length, peer))
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
        raise RemoteProtocolError(f"UCX bootstrap from {peer}: invalid hello: {exc}") from None


def _bootstrap(sock: socket.socket, peer: str, options: UcxOptions, *, client: bool, timeout_s: float) -> UcxConnection:
    """Swap worker addresses over ``sock``, create the endpoint and ping over UCX."""
    sock.settimeout(timeout_s)
    try:
        hub = _Hub.get(options)
        mine = _Hello(hub.address, hub.host_id, hub.new_prefix(), options.shared_memory, hub.fabrics)
        if client:
            _send_hello(sock, mine, with_magic=True)
            theirs = _recv_hello(sock, peer)
        else:
            theirs = _recv_hello(sock, peer)
            _send_hello(sock, mine, with_magic=False)
    except OSError as exc:
        raise PeerLostError(f"UCX bootstrap with {peer} failed: {exc}") from None
    local = theirs.host_id == hub.host_id and theirs.shared_memory and options.shared_memory
    try:
        address = hub.api.UCXAddress.create_from_buffer(theirs.worker_address)
        with hub.lock:
            ep = hub.api.UCXEndpoint.create_from_worker_address(hub.worker, address, not local)
    except Exception as exc:  # noqa: BLE001 - any UCX failure here means "not reachable over UCX"
        raise _map_error(exc, peer) from None
    conn = UcxConnection(
        hub, sock, ep, peer, send_prefix=theirs.tag_prefix, recv_prefix=mine.tag_prefix, local=local, options=options,
        shared_fabrics=tuple(sorted(set(hub.fabrics) & set(theirs.fabrics))),
    )
    try:
        conn.set_timeout(min(timeout_s, options.peer_timeout_s))
        _ping(conn, client)
        conn.set_timeout(None)
    except KVWireError:
        conn.close()
        raise
    sock.settimeout(None)
    sock.setblocking(False)
    return conn


def _ping(conn: UcxConnection, client: bool) -> None:
    """One round trip over UCX, so an unreachable fabric fails here (and ``auto`` falls back)."""
    probe = memoryview(bytearray(8))
    if client:
        conn.send([b"kvw-ping"])
        conn.recv_into(probe)
    else:
        conn.recv_into(probe)
        conn.send([b"kvw-ping"])
    if bytes(probe) != b"kvw-ping":
        raise RemoteProtocolError(f"UCX ping with {conn.peer} returned {bytes(probe)!r}")


# -- the connection -----------------------------------------------------------------------


class UcxConnection:
    """One byte stream over a UCX endpoint; see the module docstring for the framing."""

    def __init__(
        self,
        hub: _Hub,
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
                                         fabrics=shared_fabrics, shared_memory=local)
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
        self._ctrl_bufs = [np.zeros(_CTRL_BYTES, dtype=np.uint8) for _ in range(2)]
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
        self._recvs: list = []  # (request, sequence number) of receives posted and maybe pending
        self._sock_fd = sock.fileno()
        hub.watch(self)

    # -- Connection interface ------------------------------------------------------------

    def send(self, buffers: Sequence) -> None:
        """Write all buffers in order: small ones inline in a control message, large ones as is."""
        with self._send_lock:
            self._check()
            requests, keep = [], []
            segments, inline, inline_bytes = [], [], 0
            bulks = []
            for buf in buffers:
                if device.is_device(buf):
                    nbytes = self._hub.Array(buf).nbytes
                    view = buf
                else:
                    view = memoryview(buf)
                    if view.format != "B" or view.ndim != 1:
                        view = view.cast("B")
                    nbytes = view.nbytes
                if not nbytes:
                    continue
                if not device.is_device(view) and nbytes < self._inline_bytes:
                    if inline_bytes + nbytes > _CTRL_BYTES - 8 * _MAX_SEGMENTS or len(segments) >= _MAX_SEGMENTS:
                        self._post_group(segments, inline, bulks, requests, keep)
                        segments, inline, inline_bytes, bulks = [], [], 0, []
                    segments.append(nbytes)
                    inline.append(view)
                    inline_bytes += nbytes
                else:
                    if len(segments) >= _MAX_SEGMENTS:
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
            self._reap(self._window_bytes)

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
                raise self._fail(_map_error(error, self.peer), requests, keep) from None
            if not self._inflight:
                return
            newest = self._inflight[-1][2] if limit_bytes else 0
            if self._inflight_bytes - newest <= limit_bytes:
                return
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

    def _forget_sent(self) -> None:
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
        cuda = device.is_device(view)
        if cuda:
            view = device.device_bytes(view, writable=True)[0]  # flat bytes: offsets slice it
        else:
            view = memoryview(view)
            if view.format != "B" or view.ndim != 1:
                view = view.cast("B")
        total = self._hub.Array(view).nbytes if cuda else view.nbytes
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
                    if cuda:
                        device.copy(view[pos : pos + take], head[:take])  # the few inline bytes
                    else:
                        view[pos : pos + take] = head[:take]
                    if take == len(head):
                        self._segments.popleft()
                    else:
                        self._segments[0] = head[take:]
                    pos += take
                elif head <= total - pos:
                    pos = self._recv_bulks(view, pos, total)
                else:
                    self._stage(head)

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
        ctrl = b"".join([_SEGMENT.pack(len(segments)), struct.pack(f"<{len(segments)}q", *segments), *inline])
        posts = [np.frombuffer(ctrl, dtype=np.uint8)]
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
            raise self._fail(_map_error(exc, self.peer), requests, keep) from None

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
            raise self._fail(_map_error(exc, self.peer), [], []) from None

    def _next_control(self) -> None:
        if self._ctrl_req is None:
            self._post_control()
        buf, req = self._ctrl_buf, self._ctrl_req
        self._wait([req], [buf])
        self._check()  # completed by close() (see _close_endpoint), not by the peer
        self._ctrl_req = None
        (count,) = _SEGMENT.unpack_from(buf, 0)
        if count > _MAX_SEGMENTS:
            raise self._fail(RemoteProtocolError(f"UCX control message from {self.peer} lists {count} segments"), [], [])
        lengths = struct.unpack_from(f"<{count}q", buf, _SEGMENT.size)
        position = _SEGMENT.size + 8 * count
        data = memoryview(buf)
        num_bulks = 0
        for length in lengths:
            if length > 0:
                if position + length > _CTRL_BYTES:
                    raise self._fail(RemoteProtocolError(f"UCX control message from {self.peer} is malformed"), [], [])
                self._segments.append(data[position : position + length])
                position += length
            elif length < 0:
                self._segments.append(-length)
                num_bulks += 1
            else:
                raise self._fail(RemoteProtocolError(f"UCX control message from {self.peer} is malformed"), [], [])
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
            raise self._fail(_map_error(exc, self.peer), requests, keep) from None

    def _raise_if_broken(self, deadline: float | None) -> None:
        if self._closed:
            raise PeerLostError(f"UCX connection to {self.peer} was closed")
        if self._peer_gone:
            raise PeerLostError(f"UCX connection to {self.peer} closed by the peer")
        if deadline is not None and time.monotonic() >= deadline:
            raise TransferTimeout(f"UCX connection to {self.peer} timed out")

    def _check_socket(self) -> None:
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
                self, self._sock_fd
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
        for pending, buffers, _ in tuple(self._inflight):  # (the hub's _forget_sent may pop meanwhile)
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
        self._hub.unwatch(self, self._sock_fd)
        self._hub.sending.discard(self)  # (closed: _forget_sent no longer applies)
        self._sock.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001, S110 - interpreter teardown: the process is going away
            pass


# -- listener and backend -----------------------------------------------------------------


def peek_magic(sock: socket.socket, timeout_s: float) -> bool:
    """Whether an accepted socket starts with a UCX bootstrap (the bytes stay unread)."""
    sock.settimeout(timeout_s)
    try:
        head = sock.recv(len(MAGIC), socket.MSG_PEEK | socket.MSG_WAITALL)
    except OSError:
        return False
    return head == MAGIC


def accept_bootstrap(sock: socket.socket, peer: str, options: UcxOptions, timeout_s: float) -> UcxConnection:
    """Server side of the bootstrap on an accepted socket; closes it on failure."""
    try:
        sock.settimeout(timeout_s)
        magic = _recv_exact(sock, len(MAGIC), peer)
        if magic != MAGIC:
            raise RemoteProtocolError(f"{peer} did not start a kvwire UCX bootstrap")
        return _bootstrap(sock, peer, options, client=False, timeout_s=timeout_s)
    except OSError as exc:
        sock.close()
        raise PeerLostError(f"UCX bootstrap with {peer} failed: {exc}") from None
    except KVWireError:
        sock.close()
        raise


class _Pending:
    """An accepted TCP connection whose UCX bootstrap runs later, in its own thread."""

    def __init__(self, sock: socket.socket, peer: str):
        self.sock = sock
        self.peer = peer

    def set_timeout(self, seconds: float | None) -> None:
        self.sock.settimeout(seconds)

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


class UcxListener:
    """A TCP port for bootstraps; ``start_tls`` (per connection thread) does the UCX part."""

    def __init__(self, address: str, options: UcxOptions):
        self._port = ListeningSocket(address, TcpOptions(peer_timeout_s=options.peer_timeout_s))
        self.address = self._port.address
        self._options = options
        _Hub.get(options)  # fail at listen(), not at the first peer, when UCX cannot start

    def accept(self) -> _Pending | None:
        accepted = self._port.accept()
        return None if accepted is None else _Pending(*accepted)

    def start_tls(self, conn: _Pending, timeout_s: float) -> UcxConnection:
        """Run the UCX bootstrap of an accepted connection (no TLS over UCX)."""
        return accept_bootstrap(conn.sock, conn.peer, self._options, timeout_s)

    def close(self) -> None:
        self._port.close()


class UcxBackend:
    """``backend="ucx"``: host and CUDA memory over UCX; no TLS (use ``tcp`` across sites)."""

    name = "ucx"
    options_type = UcxOptions

    def connect(self, address: str, *, timeout_s: float, ssl_context=None, options=None) -> UcxConnection:
        if ssl_context is not None:
            raise ValueError("the ucx backend has no TLS; use backend='tcp' (or 'auto') with an ssl_context")
        options = check_options(self.name, options, self.options_type)
        host, port = parse_address(address, what="peer address")
        sock = dial(address, host, port, timeout_s)
        configure_socket(sock, TcpOptions(peer_timeout_s=options.peer_timeout_s))
        try:
            return _bootstrap(sock, address, options, client=True, timeout_s=timeout_s)
        except KVWireError:
            sock.close()
            raise

    def listen(self, address: str, *, ssl_context=None, options=None) -> UcxListener:
        if ssl_context is not None:
            raise ValueError("the ucx backend has no TLS; use backend='tcp' (or 'auto') with an ssl_context")
        return UcxListener(address, check_options(self.name, options, self.options_type))
