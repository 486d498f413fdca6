"""How a received chunk's bytes reach their memory, and are checked, on one connection.

The receiving core (``kvwire.protocol.receiving``) says which request a chunk belongs
to; ``Landing`` moves it: straight into the request's views where it can (host memory,
or one CUDA buffer over a connection that takes device memory), otherwise through a
reusable landing buffer that is checked before anything is copied on, so bytes that fail
their checksum never reach the engine's arrays. Large chunks are checked by a verifier
thread while the reader receives the next one.
"""

from __future__ import annotations

import collections
import logging
import threading
from typing import Callable

import numpy as np

from . import device, native
from .wire.blocksum import frame_blocksum
from .wire.checksum import frame_checksum, layers_checksum
from .wire.messages import Data, Layers
from .wire.reader import FrameReader

log = logging.getLogger(__name__)

SMALL_PIECE_BYTES = 64 * 1024  # many views smaller than this: one receive into a landing buffer instead
OVERLAP_MIN_BYTES = 1 << 20  # chunks at least this large are verified while the next one arrives


def checksum_matches(msg: Data, pieces: list, any_on_device: bool = True) -> bool:
    """Whether a received payload (host or device pieces, in order) has the frame's checksum.
    ``any_on_device`` False: every piece is known to be host memory (nothing to ask)."""
    if msg.algorithm == "none":  # a session that agreed to skip checks (SessionBook.on_chunk)
        return True
    if not any_on_device and msg.algorithm == "xxh3":
        return frame_checksum(msg.rid, msg.layer, msg.chunk, pieces, msg.nbytes) == msg.checksum
    on_device = [device.is_device(piece) for piece in pieces]
    if msg.algorithm == "blocksum" and len(pieces) == 1 and on_device[0]:
        return device.frame_blocksum(msg.rid, msg.layer, msg.chunk, pieces[0]) == msg.checksum
    if any(on_device):
        pieces = [device.to_host(piece) if here else piece for piece, here in zip(pieces, on_device)]
    checksum = frame_blocksum if msg.algorithm == "blocksum" else frame_checksum
    return checksum(msg.rid, msg.layer, msg.chunk, pieces, msg.nbytes) == msg.checksum


def _copy_to_device(landing, views: list) -> None:
    """Copy a checked landing buffer into its views (some CUDA memory), in order; done
    before the landing buffer is reused."""
    position = 0
    for view in views:
        device.copy(view, landing[position : position + len(view)])
        position += len(view)
    device.synchronize()


class Verifier:
    """A thread that checks a connection's chunks while its reader receives the next one.

    Receiving a chunk (a copy by the kernel or by UCX) and hashing it each take a core;
    done one after the other in the reader thread, the link waited while the CPU hashed.
    Jobs run in the order they were queued, so a layer's ack still follows its chunks.
    """

    def __init__(self, name: str):
        self._jobs: collections.deque = collections.deque()
        self._cv = threading.Condition()
        self._closed = False
        threading.Thread(target=self._run, name=name, daemon=True).start()

    def submit(self, job) -> None:
        with self._cv:
            self._jobs.append(job)
            self._cv.notify()

    def close(self) -> None:
        """Stop once the queued jobs have run."""
        with self._cv:
            self._closed = True
            self._cv.notify()

    def _run(self) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._jobs or self._closed)
                if not self._jobs:
                    return
                job = self._jobs.popleft()
            try:
                job()
            except Exception:  # a job's failure is its request's, never the thread's
                log.exception("verifying a chunk failed")
            job = None  # waiting for the next job, this thread must not keep the last one's arrays alive


class Landing:
    """One connection's receive side: its reusable landing buffers and its verifier thread.
    Payloads are read through the connection's ``FrameReader`` (which may hold their first
    bytes already)."""

    def __init__(self, reader: FrameReader):
        self.reader = reader
        self.conn = reader.conn
        self._scratch: np.ndarray | None = None
        self._device_scratch = None
        self._verifier: Verifier | None = None

    def receive(self, msg: Data, request, views: list, on_device: bool, checked: Callable[[bool, bool], None]) -> None:
        """Receive ``msg``'s payload into ``views`` (the request's memory for its chunk, for
        which ``request.begin_write()`` was granted; ended here once nothing more is written;
        ``on_device``: some of it is CUDA memory) and call ``checked(ok, in_reader)`` with
        whether it matched its checksum: at once (in the reader's thread), or from the
        verifier thread for a large chunk while more of the request follows."""
        # One CUDA view on a connection that takes device memory: UCX puts the bytes
        # straight there, like host bytes, and the GPU checks them in place. Else a landing
        # buffer: one receive instead of one per piece (and TCP cannot write the GPU).
        in_place = not on_device or (len(views) == 1 and self.conn.capabilities.device_memory)
        if not in_place or (len(views) > 8 and msg.nbytes < SMALL_PIECE_BYTES * len(views)):
            try:
                ok = self._receive_scattered(msg, views, on_device)
            finally:
                request.end_write()
            return checked(ok, True)
        try:
            if on_device:
                self.reader.read_into(views[0])
            else:
                self.reader.read_into_many(views)
            request.landed(msg.layer, msg.chunk)  # a copy arriving before the check is drained
        finally:
            request.end_write()  # verifying only reads (and holding this while queued deadlocked a release)

        if msg.nbytes >= OVERLAP_MIN_BYTES and not request.missing_only(msg.layer, msg.chunk):
            # more of this request follows: receive it meanwhile
            self._verifier_thread().submit(lambda: checked(checksum_matches(msg, views, on_device), False))
        else:
            checked(checksum_matches(msg, views, on_device), True)

    def receive_layers(self, msg: Layers, request, parts: list[tuple[int, list, bool, bool]]) -> tuple[bool, list]:
        """Receive a Layers frame's payload: ``parts`` are its layers in order, each
        (layer, views, on_device, already_here), for ``request``, whose ``begin_write()``
        was granted (ended here). Straight into the views when every layer is new and in
        host memory, else through the landing buffer, checked before anything is copied on
        (a layer already here is not written again). Whether it matched its checksum, and
        the layers written."""
        direct = not any(on_device or here for _, _, on_device, here in parts)
        try:
            if direct:
                views = [view for _, layer_views, _, _ in parts for view in layer_views]
                self.reader.read_into_many(views)
                request.landed_whole(msg.layers)
            else:
                landing = self._host_scratch(msg.nbytes)
                self.reader.read_into(memoryview(landing))
                views = [landing]
        finally:
            if direct:
                request.end_write()
        ok = msg.algorithm == "none" or layers_checksum(msg.rid, msg.layers, views, msg.nbytes) == msg.checksum
        if direct:
            return ok, msg.layers
        written = []
        try:
            position = 0
            for layer, layer_views, on_device, here in parts:
                nbytes = request.plan.layers[layer].nbytes
                if ok and not here and not request.is_duplicate(layer, 0):
                    piece = landing[position : position + nbytes]
                    if on_device:
                        _copy_to_device(piece, layer_views)
                    else:
                        native.scatter(piece, layer_views)
                    request.landed(layer, 0)
                    written.append(layer)
                position += nbytes
        finally:
            request.end_write()
        return ok, written

    def drain(self, nbytes: int) -> None:
        """Read and discard ``nbytes`` of payload."""
        self.reader.skip(nbytes)

    def close(self) -> None:
        """The connection ended: the verifier stops once its queued checks have run."""
        if self._verifier is not None:
            self._verifier.close()

    def _receive_scattered(self, msg: Data, views: list, to_device: bool) -> bool:
        """Receive a chunk whole into a landing buffer, verify it, then copy it into its
        views; True if it verified. For a chunk spanning many small tensors (one receive
        instead of one per tensor), and for a chunk bound for several CUDA buffers, or for
        CUDA buffers over a connection that cannot write them (received and checked on the
        GPU when the connection takes device memory). ``to_device``: some view is CUDA memory."""
        landing = self._landing(msg.nbytes) if to_device else self._host_scratch(msg.nbytes)
        self.reader.read_into(landing if device.is_device(landing) else memoryview(landing))
        if not checksum_matches(msg, [landing], to_device):
            return False
        if not to_device:  # host to host, often thousands of small views: one call
            native.scatter(landing, views)
            return True
        _copy_to_device(landing, views)
        return True

    def _host_scratch(self, nbytes: int) -> np.ndarray:
        """This connection's reusable host receive buffer, at least ``nbytes`` long."""
        if self._scratch is None or len(self._scratch) < nbytes:
            self._scratch = np.empty(nbytes, dtype=np.uint8)
        return self._scratch[:nbytes]

    def _landing(self, nbytes: int):
        """Where a chunk bound for several CUDA buffers, or for CUDA buffers over a
        connection that cannot write them (TCP), is received and checked before it is
        copied into them: device memory if the connection takes it (UCX), else host
        memory. (A chunk bound for one CUDA buffer over UCX lands in it directly.)"""
        if not self.conn.capabilities.device_memory:
            return self._host_scratch(nbytes)
        if self._device_scratch is None or len(self._device_scratch) < nbytes:
            self._device_scratch = device.empty(nbytes)
        return self._device_scratch[:nbytes]

    def _verifier_thread(self) -> Verifier:
        if self._verifier is None:
            self._verifier = Verifier(f"kvwire-rx-verify-{self.conn.peer}")
        return self._verifier
