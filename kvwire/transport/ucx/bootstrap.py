"""A UCX connection's start, over a plain TCP socket that then stays open as its liveness
channel: both sides swap worker addresses (msgspec, bounded), create an endpoint to the
other's worker and ping each other over UCX before the connection is handed up."""

from __future__ import annotations

import socket
import struct
from typing import Annotated

import msgspec

from ...errors import KVWireError, PeerLostError, RemoteProtocolError
from ..base import UcxOptions
from .connection import UcxConnection
from .hub import Hub
from .library import map_error

MAGIC = b"\x00\x00\x00\x00kvwire-ucx/1"  # a zero TCP frame length: a TCP-only receiver refuses it at once
_HELLO_LIMIT_BYTES = 64 * 1024


class _Hello(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    worker_address: bytes
    host_id: str
    tag_prefix: int
    shared_memory: bool
    fabrics: Annotated[list[Annotated[str, msgspec.Meta(max_length=64)]], msgspec.Meta(max_length=64)] = []


_hello_decoder = msgspec.msgpack.Decoder(_Hello)


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


def bootstrap(sock: socket.socket, peer: str, options: UcxOptions, *, client: bool, timeout_s: float) -> UcxConnection:
    """Swap worker addresses over ``sock``, create the endpoint and ping over UCX."""
    sock.settimeout(timeout_s)
    try:
        hub = Hub.get(options)
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
        raise map_error(exc, peer) from None
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
        return bootstrap(sock, peer, options, client=False, timeout_s=timeout_s)
    except OSError as exc:
        sock.close()
        raise PeerLostError(f"UCX bootstrap with {peer} failed: {exc}") from None
    except KVWireError:
        sock.close()
        raise
