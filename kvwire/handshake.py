"""Runs the handshake of ``kvwire.protocol.handshake`` over a connection.

The decisions (proofs, version, layout, what to answer) are the state machines'; this
module only moves their messages: it writes what a step says to send, reads the next
framed message within the handshake's time limit, and raises what a step says failed.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Container

from .errors import KVWireError, ProtocolError, RemoteProtocolError
from .layout import KVLayout
from .protocol.handshake import Accepted, ClientHandshake, ServerHandshake, Step
from .transport.base import Connection
from .wire import framing
from .wire.messages import Hello, Welcome


def client_handshake(
    conn: Connection,
    *,
    layout: KVLayout | None,
    secret: bytes | None,
    session_id: bytes,
    stream_index: int,
    num_streams: int,
    resume: bool = False,
    verify: bool = True,
    timeout_s: float | None = None,
) -> Welcome:
    """Run the sender's side; raises AuthenticationError, LayoutMismatchError, ...
    ``layout=None`` probes: the Welcome carries the receiver's info, and nothing follows.
    ``timeout_s`` bounds the whole handshake (None: the connection's own timeout)."""
    shake = ClientHandshake(layout=layout, secret=secret, session_id=session_id, stream_index=stream_index,
                            num_streams=num_streams, nonce=os.urandom(32), resume=resume, verify=verify,
                            peer=conn.peer, timeout_s=timeout_s)
    return run(conn, shake, shake.start()).welcome


def server_handshake(
    conn: Connection,
    *,
    layout: KVLayout,
    secret: bytes | None,
    welcome: Callable[[Hello], Welcome],
    also_accepted: Container[str] = (),
    require_verify: bool = True,
    timeout_s: float | None = None,
) -> Hello:
    """Run the receiver's side; refuses the peer (telling it why) and raises on failure.
    Returns the sender's Hello once its Welcome is sent."""
    shake = ServerHandshake(layout=layout, secret=secret, nonce=os.urandom(32), welcome=welcome,
                            also_accepted=also_accepted, require_verify=require_verify, peer=conn.peer,
                            timeout_s=timeout_s)
    return run(conn, shake, Step()).hello


def run(conn: Connection, shake: ClientHandshake | ServerHandshake, step: Step) -> Accepted:
    """Carry out ``step`` and every step after it until the handshake is accepted or fails."""
    while True:
        frames = [framing.encode(message) for message in step.send]
        if step.error is not None:
            try:
                conn.send(frames)
            except KVWireError:
                pass  # the refusal is a courtesy: the peer may be gone
            raise step.error
        if frames:
            conn.send(frames)
        if step.accepted is not None:
            return step.accepted
        seconds = shake.seconds_left()
        if seconds is not None:
            conn.set_timeout(seconds)
        step = shake.receive(read_message(conn, shake.read_limit))


def read_message(conn: Connection, limit: int):
    """The next handshake message; bytes that cannot be one mean the peer is not kvwire
    (an HTTP server answering our Hello starts with b'HTTP'), and the error says so."""
    prefix = bytearray(framing.PREFIX_BYTES)
    conn.recv_into(memoryview(prefix))
    try:
        body = bytearray(framing.header_length(prefix, limit))
        conn.recv_into(memoryview(body))
        return framing.decode_handshake(body)
    except ProtocolError as exc:
        raise RemoteProtocolError(
            f"the peer at {conn.peer} does not speak kvwire: it sent {bytes(prefix)!r}... ({exc})"
        ) from None
