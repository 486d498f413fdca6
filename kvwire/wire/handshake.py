"""The handshake every stream starts with: version, mutual HMAC proof, layout check.
A probe runs the same proofs without a layout and gets the receiver's published info
(``Welcome.info``: for example a decode instance's ranks and geometry) instead of a stream.

Sender: Hello -> receiver: Challenge -> sender: Auth -> receiver: Welcome or Reject.
Each side proves the secret over both nonces and the session id, under its own label,
so a proof can be neither replayed nor reflected. The receiver reveals nothing beyond
its layout hash before the sender has proven itself.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from typing import Callable, Container

from ..errors import (
    AuthenticationError,
    KVWireError,
    LayoutMismatchError,
    ProtocolError,
    error_from_kind,
    kind_of,
)
from ..layout import KVLayout
from ..transport.base import Connection
from . import framing
from .messages import PROTOCOL_VERSION, Auth, Challenge, Hello, Reject, Welcome

_SENDER_LABEL = b"kvwire/1 sender proof"
_RECEIVER_LABEL = b"kvwire/1 receiver proof"


def _proof(secret: bytes | None, label: bytes, hello: Hello, receiver_nonce: bytes) -> bytes:
    if not secret:
        return b""
    material = label + hello.session_id + hello.nonce + receiver_nonce
    return hmac.new(secret, material, hashlib.sha256).digest()


def send_message(conn: Connection, message) -> None:
    conn.send([framing.encode(message)])


def read_handshake_message(conn: Connection, limit: int):
    """The next handshake message; bytes that cannot be one mean the peer is not kvwire
    (an HTTP server answering our Hello starts with b'HTTP'), and the error says so."""
    prefix = bytearray(framing.PREFIX_BYTES)
    conn.recv_into(memoryview(prefix))
    try:
        body = bytearray(framing.header_length(prefix, limit))
        conn.recv_into(memoryview(body))
        return framing.decode_handshake(body)
    except ProtocolError as exc:
        raise ProtocolError(
            f"the peer at {conn.peer} does not speak kvwire: it sent {bytes(prefix)!r}... ({exc})"
        ) from None


def _raise_if_reject(message) -> None:
    if isinstance(message, Reject):
        raise error_from_kind(message.kind, message.reason)


def client_handshake(
    conn: Connection,
    *,
    layout: KVLayout | None,
    secret: bytes | None,
    session_id: bytes,
    stream_index: int,
    num_streams: int,
    resume: bool = False,
) -> Welcome:
    """Run the sender's side; raises AuthenticationError, LayoutMismatchError, ...
    ``layout=None`` probes: the Welcome carries the receiver's info, and nothing follows."""
    fingerprint = "" if layout is None else layout.fingerprint
    hello = Hello(PROTOCOL_VERSION, session_id, stream_index, num_streams, fingerprint, os.urandom(32), resume,
                  probe=layout is None)
    send_message(conn, hello)
    challenge = read_handshake_message(conn, framing.MAX_STREAM_HEADER_BYTES)
    _raise_if_reject(challenge)
    challenge = framing.expect(challenge, Challenge)
    if secret:
        expected = _proof(secret, _RECEIVER_LABEL, hello, challenge.nonce)
        if not hmac.compare_digest(expected, challenge.proof):
            why = "has no secret configured" if not challenge.proof else "has a different secret"
            send_message(conn, Reject("auth", f"sender: receiver's proof is wrong (it {why})"))
            raise AuthenticationError(f"receiver at {conn.peer} failed to prove the shared secret (it {why})")
    differs = layout is not None and challenge.fingerprint != layout.fingerprint
    proof = _proof(secret, _SENDER_LABEL, hello, challenge.nonce)
    send_message(conn, Auth(proof, layout.describe() if differs else None))
    reply = read_handshake_message(conn, framing.MAX_STREAM_HEADER_BYTES)
    _raise_if_reject(reply)
    return framing.expect(reply, Welcome)


def server_handshake(
    conn: Connection,
    *,
    layout: KVLayout,
    secret: bytes | None,
    welcome: Callable[[Hello], Welcome],
    also_accepted: Container[str] = (),
) -> Hello:
    """Run the receiver's side; refuses the peer (telling it why) and raises on failure.
    ``welcome`` makes the accepting reply once the peer is authenticated. A sender's layout
    must be ``layout`` or have a fingerprint in ``also_accepted``; a probe has none."""
    hello = framing.expect(read_handshake_message(conn, framing.MAX_STREAM_HEADER_BYTES), Hello)
    if hello.protocol != PROTOCOL_VERSION:
        _refuse(
            conn, ProtocolError(f"protocol version {hello.protocol} not supported (receiver speaks {PROTOCOL_VERSION})")
        )
    nonce = os.urandom(32)
    send_message(
        conn, Challenge(PROTOCOL_VERSION, nonce, _proof(secret, _RECEIVER_LABEL, hello, nonce), layout.fingerprint)
    )
    auth = read_handshake_message(conn, framing.MAX_HANDSHAKE_HEADER_BYTES)
    if isinstance(auth, Reject):
        raise AuthenticationError(f"sender at {conn.peer} refused us: {auth.reason}")
    auth = framing.expect(auth, Auth)
    if secret:
        expected = _proof(secret, _SENDER_LABEL, hello, nonce)
        if not auth.proof:
            _refuse(conn, AuthenticationError("sender sent no proof, but this receiver requires a secret"))
        if not hmac.compare_digest(expected, auth.proof):
            _refuse(conn, AuthenticationError("sender's proof of the shared secret is wrong (different secret)"))
    if not hello.probe and hello.fingerprint != layout.fingerprint and hello.fingerprint not in also_accepted:
        _refuse(conn, LayoutMismatchError(_layout_difference(layout, auth)))
    send_message(conn, welcome(hello))
    return hello


def _layout_difference(layout: KVLayout, auth: Auth) -> str:
    if auth.layout is None:
        return "layout fingerprints differ"
    try:
        theirs = KVLayout.from_description(auth.layout)
    except ValueError as exc:
        return f"sender's layout is invalid: {exc}"
    return "KV layout mismatch: " + layout.difference(theirs)


def _refuse(conn: Connection, error: KVWireError) -> None:
    """Tell the peer why (best effort: it may already be gone), then raise."""
    try:
        send_message(conn, Reject(kind_of(error), str(error)))
    except KVWireError:
        pass
    raise error
