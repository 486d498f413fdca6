"""Reading frames off a connection through one buffer.

Without it every frame costs a receive for its 4-byte prefix, one for its header and one
per payload piece, each a system call that lets go of the GIL and must win it back: for
requests of a few hundred KiB that, not the bytes, was the receiver's time (perf/README.md,
"Small requests"). ``FrameReader`` asks the connection for whatever has arrived, up to
its buffer, and serves prefixes, headers and small payloads from there; a payload larger
than what is buffered is received straight into its destination after the buffered part
is copied, so large chunks still land without a copy. Connections that cannot return
less than asked (``Capabilities.partial_reads`` False: UCX, whose control messages
already carry small frames together) are read exactly.

``before_wait`` runs before each receive from the connection, which may block: the moment
to send replies held back while more frames were at hand (the receiver's acks), one
write for all of them.
"""

from __future__ import annotations

from collections.abc import Callable

from . import framing

BUFFER_BYTES = 256 * 1024


class FrameReader:
    def __init__(self, conn, header_limit: int, *, before_wait: Callable[[], None] | None = None,
                 buffer_bytes: int = BUFFER_BYTES):
        self.conn = conn
        self._limit = header_limit
        self._partial = conn.capabilities.partial_reads
        self._buffer = memoryview(bytearray(max(buffer_bytes, framing.PREFIX_BYTES + header_limit)))
        self._start = 0  # buffered bytes are _buffer[_start:_end]
        self._end = 0
        self._before_wait = before_wait

    @property
    def buffered(self) -> int:
        return self._end - self._start

    def next_message(self, decode=framing.decode_stream):
        """The next frame's header, decoded (a Data frame's payload follows: ``read_into``
        or ``skip`` it)."""
        self._fill(framing.PREFIX_BYTES)
        start = self._start
        length = framing.header_length(self._buffer[start : start + framing.PREFIX_BYTES], self._limit)
        self._fill(framing.PREFIX_BYTES + length)
        start = self._start
        message = decode(self._buffer[start + framing.PREFIX_BYTES : start + framing.PREFIX_BYTES + length])
        self._start += framing.PREFIX_BYTES + length
        return message

    def read_into(self, view) -> None:
        """Fill ``view`` with the next payload bytes: host memory, or CUDA memory over a
        connection that reads exactly (its buffer holds nothing once a header is read)."""
        take = min(self.buffered, len(view))
        if take:
            view[:take] = self._buffer[self._start : self._start + take]
            self._start += take
        if take < len(view):
            self._wait()
            self.conn.recv_into(view[take:] if take else view)

    def read_into_many(self, views: list) -> None:
        """Fill host ``views`` in order with the next payload bytes: what is buffered is
        copied, the rest received in one call."""
        rest = [memoryview(view).cast("B") for view in views]
        while rest and self.buffered:
            take = min(self.buffered, len(rest[0]))
            rest[0][:take] = self._buffer[self._start : self._start + take]
            self._start += take
            rest[0] = rest[0][take:]
            if not len(rest[0]):
                rest.pop(0)
        if rest:
            self._wait()
            self.conn.recv_into_many(rest)

    def skip(self, nbytes: int) -> None:
        """Read and discard ``nbytes`` of payload."""
        while nbytes:
            if not self.buffered:
                self._start = self._end = 0
                self._receive(min(nbytes, len(self._buffer)))
            take = min(self.buffered, nbytes)
            self._start += take
            nbytes -= take

    def _fill(self, need: int) -> None:
        """At least ``need`` bytes buffered (``need`` fits the buffer)."""
        if self.buffered >= need:
            return
        if self._start + need > len(self._buffer):  # move what is here to the front
            have = self.buffered
            self._buffer[:have] = self._buffer[self._start : self._end]
            self._start, self._end = 0, have
        self._receive(need - self.buffered)

    def _receive(self, need: int) -> None:
        """Receive at least ``need`` more bytes after the buffered ones."""
        self._wait()
        if not self._partial:
            self.conn.recv_into(self._buffer[self._end : self._end + need])
            self._end += need
            return
        target = self._end + need
        while self._end < target:
            self._end += self.conn.recv_some(self._buffer[self._end :])

    def _wait(self) -> None:
        if self._before_wait is not None:
            self._before_wait()
