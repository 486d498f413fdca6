"""The process's one UCX context and worker, and the threads that take turns progressing it.

One waiting thread at a time (the leader) progresses the worker and blocks in epoll on
its event fd, every connection's liveness socket and a kick eventfd; the others wait on a
condition that the leader notifies after each round. No thread spins, and no completion
is missed because another thread happened to progress it. The hub knows a connection
only through ``Watched``.
"""

from __future__ import annotations

import itertools
import logging
import os
import select
import threading
import time
from typing import Protocol

import numpy as np

from ... import device
from ...errors import TransferTimeout
from ..base import UcxOptions
from .control import UNBLOCK
from .fabrics import context_transports, fabric_transports, host_id
from .library import load_ucxx
from .options import HOST_ONLY, tuned_defaults

log = logging.getLogger(__name__)

_IDLE_WAIT_S = 0.1  # the longest a waiter sleeps before re-checking its deadline and flags
_IDLE_PROGRESS_S = 1.0  # the idle thread's longest sleep (UCX events and kicks wake it sooner)
_IDLE_AFTER_S = 0.05  # the idle thread leads only once no thread has waited for this long (and checks this often)


class Watched(Protocol):
    """What the hub asks of a connection."""

    liveness_fd: int  # its liveness socket: readable when the peer closes it or dies

    def check_liveness(self) -> None:
        """The liveness socket became readable: find out whether the peer is gone."""

    def raise_if_broken(self, deadline: float | None) -> None:
        """Raise the connection's error (closed, peer gone, past ``deadline``), if any."""

    def forget_sent(self) -> None:
        """Let go of the buffers of sends UCX has finished with."""


class Hub:
    """The process's UCX context and worker, shared by every connection."""

    _instance: Hub | None = None
    _lock = threading.Lock()

    def __init__(self, options: UcxOptions):
        self.api, self.Array = load_ucxx()
        # ucxx writes UCX_* variables into os.environ when imported; UCX would then warn
        # about those this machine does not use (no CUDA), which is noise for our users.
        config = {"WARN_UNUSED_ENV_VARS": "n", **dict(options.ucx_config)}
        self.context, self.worker = self._start_tuned(tuned_defaults(options.ucx_config), config)
        # Every call into ucxx (progress, arm, post, endpoint create/close) holds this lock:
        # ucxx crashed (SIGSEGV) when one thread closed an endpoint, after its peer died,
        # while another progressed the worker. The leader drops it while it sleeps in epoll.
        self.lock = threading.RLock()
        self.worker.init_blocking_progress_mode()
        self.epoll_fd = self.worker.epoll_file_descriptor
        self.address = bytes(self.worker.address)
        self.host_id = host_id()
        self.cuda = _opens_cuda(self.context)
        self.fabrics = fabric_transports(self.context.info)
        self._ids = itertools.count(int.from_bytes(os.urandom(2), "little") << 16)
        self.cond = threading.Condition()
        self.leader: int | None = None
        self.kick_fd = os.eventfd(0, os.EFD_NONBLOCK)
        self.epoll = select.epoll()
        self.epoll.register(self.epoll_fd, select.EPOLLIN)
        self.epoll.register(self.kick_fd, select.EPOLLIN)
        self.watched: dict[int, Watched] = {}
        self.sending: set[Watched] = set()  # connections holding buffers of sends in flight
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

    def _start_tuned(self, tuned: dict, config: dict):
        """Start with kvwire's defaults under the user's settings; without them where UCX
        refuses them, and without those measured on sockets and shared memory only
        (``HOST_ONLY``) where the context has RDMA or a GPU."""
        try:
            context, worker = self._start(tuned | config)
        except Exception as exc:  # e.g. a ucx.conf whose TCP_RX_SEG_SIZE is under kvwire's TX segment
            if not tuned:
                raise
            log.info("UCX refused kvwire's defaults %s (%s); starting with UCX's own", tuned, exc)
            return self._start(config)
        if HOST_ONLY.isdisjoint(tuned) or not (fabric_transports(context.info) or _opens_cuda(context)):
            return context, worker
        del worker, context  # (the worker first: it holds the context)
        return self._start({k: v for k, v in tuned.items() if k not in HOST_ONLY} | config)

    @classmethod
    def get(cls, options: UcxOptions) -> Hub:
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
            buf = self.Array(np.frombuffer(UNBLOCK, dtype=np.uint8))
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

    def watch(self, conn: Watched) -> None:
        with self.cond:
            fd = conn.liveness_fd
            self.epoll.register(fd, select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR)
            self.watched[fd] = conn

    def unwatch(self, conn: Watched, fd: int) -> None:
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

    def wait(self, conn: Watched | None, requests: list, deadline: float | None) -> None:
        """Until ``requests`` complete; raises what ``conn.raise_if_broken`` raises, or (with
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
                        conn.raise_if_broken(deadline)
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
                conn.forget_sent()

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
                    conn.check_liveness()
        with self.lock:
            self.worker.progress()  # so data a peer sent before closing is in before anyone sees it gone


def _opens_cuda(context) -> bool:
    """Whether UCX can move CUDA memory as is here. A UCX built with CUDA reports
    cuda_support on a machine without a GPU too; only a device it can open (cuda_copy in
    its resources) counts."""
    return bool(context.cuda_support) and "cuda_copy" in context_transports(context.info)
