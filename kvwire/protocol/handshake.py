"""The handshake every stream starts with, as two state machines without I/O.

Sender: Hello -> receiver: Challenge -> sender: Auth -> receiver: Welcome or Reject.
Each side proves the secret over both nonces and the session id, under its own label,
so a proof can be neither replayed (the other side's nonce is fresh) nor reflected (the
labels differ). The receiver reveals nothing beyond its layout hash before the sender has
proven itself. A probe (``layout=None``) runs the same proofs and gets the receiver's
published info in the Welcome instead of a stream.

``ClientHandshake`` and ``ServerHandshake`` are given decoded messages (and the nonce,
secret, layout and clock) and answer each with a ``Step``: the messages to send, then
either nothing more (read the next message), the handshake's ``Accepted`` result, or an
error to raise once the refusal has been sent. Reading and writing bytes is the driver's
job (``kvwire.handshake``), so these run in tests on messages alone, as h11 runs on bytes.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Container
from dataclasses import dataclass

from ..errors import (
    AuthenticationError,
    KVWireError,
    LayoutMismatchError,
    ProtocolError,
    RemoteProtocolError,
    TransferTimeout,
    VerifyMismatchError,
    error_from_kind,
    kind_of,
)
from ..layout import KVLayout
from ..wire.framing import MAX_HANDSHAKE_HEADER_BYTES, MAX_STREAM_HEADER_BYTES, MAX_WELCOME_HEADER_BYTES
from ..wire.messages import PROTOCOL_VERSION, Auth, Challenge, Hello, Reject, Welcome
from .clock import MONOTONIC, Clock

SENDER_LABEL = b"kvwire/1 sender proof"
RECEIVER_LABEL = b"kvwire/1 receiver proof"


def proof(secret: bytes | None, label: bytes, hello: Hello, receiver_nonce: bytes) -> bytes:
    """HMAC-SHA256 of one side's label, the session id and both nonces (b"" without a secret)."""
    if not secret:
        return b""
    material = label + hello.session_id + hello.nonce + receiver_nonce
    return hmac.new(secret, material, hashlib.sha256).digest()


@dataclass(frozen=True)
class Accepted:
    """How a handshake ended well, as either side saw it."""

    hello: Hello  # the sender's: its session, stream index, resume/probe flags, layout fingerprint
    protocol: int  # the version both ends speak
    authenticated: bool  # a shared secret was proven both ways (False: neither end has one)
    welcome: Welcome  # the receiver's accepting reply: its limits, session_known, info

    @property
    def fingerprint(self) -> str:
        """The layout the stream's data has ("" for a probe)."""
        return "" if self.hello.probe else self.hello.fingerprint


@dataclass(frozen=True)
class Step:
    """What to do after a message: send ``send`` (in order), then stop with ``accepted``,
    raise ``error`` (sending a refusal first is best effort: the peer may be gone), or,
    with neither, read the next message."""

    send: tuple = ()
    accepted: Accepted | None = None
    error: KVWireError | None = None


class _Deadline:
    """The whole handshake's time limit, read from a clock (a FakeClock in tests)."""

    def __init__(self, clock: Clock, timeout_s: float | None, peer: str):
        self._clock, self._timeout_s, self._peer = clock, timeout_s, peer
        self._deadline = None if timeout_s is None else clock.now() + timeout_s

    def seconds_left(self) -> float | None:
        """Seconds the next read may wait (None: no limit); TransferTimeout once spent."""
        if self._deadline is None:
            return None
        left = self._deadline - self._clock.now()
        if left <= 0:
            raise TransferTimeout(f"handshake with {self._peer} took longer than {self._timeout_s:g}s")
        return left


def _peer_refused(message: Reject) -> KVWireError:
    return error_from_kind(message.kind, message.reason)


def _unexpected(message: object, wanted: type, peer: str) -> ProtocolError:
    return RemoteProtocolError(f"{peer} sent a {type(message).__name__} message where a {wanted.__name__} belongs")


class ClientHandshake:
    """The sender's side: Hello out, Challenge in (check the receiver's proof), Auth out,
    Welcome (or Reject) in."""

    def __init__(
        self,
        *,
        layout: KVLayout | None,
        secret: bytes | None,
        session_id: bytes,
        stream_index: int,
        num_streams: int,
        nonce: bytes,
        resume: bool = False,
        verify: bool = True,
        peer: str = "the receiver",
        clock: Clock = MONOTONIC,
        timeout_s: float | None = None,
    ):
        fingerprint = "" if layout is None else layout.fingerprint
        self.hello = Hello(PROTOCOL_VERSION, session_id, stream_index, num_streams, fingerprint, nonce, resume,
                           probe=layout is None, verify=verify)
        self._layout, self._secret, self._peer = layout, secret, peer
        self._waiting_for: type | None = None
        self._deadline = _Deadline(clock, timeout_s, peer)

    @property
    def read_limit(self) -> int:
        """The longest header the next message may have (a Welcome may carry 64 KiB of info)."""
        return MAX_WELCOME_HEADER_BYTES if self._waiting_for is Welcome else MAX_STREAM_HEADER_BYTES

    def seconds_left(self) -> float | None:
        return self._deadline.seconds_left()

    def start(self) -> Step:
        self._waiting_for = Challenge
        return Step(send=(self.hello,))

    def receive(self, message) -> Step:
        if isinstance(message, Reject):
            return self._failed(_peer_refused(message))
        if self._waiting_for is Challenge and isinstance(message, Challenge):
            return self._on_challenge(message)
        if self._waiting_for is Welcome and isinstance(message, Welcome):
            self._waiting_for = None
            return Step(accepted=Accepted(self.hello, PROTOCOL_VERSION, bool(self._secret), message))
        if self._waiting_for is None:
            return self._failed(RemoteProtocolError(f"{self._peer} sent a {type(message).__name__} after the handshake ended"))
        return self._failed(_unexpected(message, self._waiting_for, self._peer))

    def _on_challenge(self, challenge: Challenge) -> Step:
        if challenge.protocol != PROTOCOL_VERSION:
            return self._failed(RemoteProtocolError(
                f"receiver at {self._peer} speaks protocol version {challenge.protocol}, this sender {PROTOCOL_VERSION}"
            ))
        if self._secret:
            expected = proof(self._secret, RECEIVER_LABEL, self.hello, challenge.nonce)
            if not hmac.compare_digest(expected, challenge.proof):
                why = "has no secret configured" if not challenge.proof else "has a different secret"
                return self._failed(
                    AuthenticationError(f"receiver at {self._peer} failed to prove the shared secret (it {why})"),
                    Reject("auth", f"sender: receiver's proof is wrong (it {why})"),
                )
        differs = self._layout is not None and challenge.fingerprint != self._layout.fingerprint
        mine = proof(self._secret, SENDER_LABEL, self.hello, challenge.nonce)
        self._waiting_for = Welcome
        return Step(send=(Auth(mine, self._layout.describe() if differs else None),))

    def _failed(self, error: KVWireError, *refusal) -> Step:
        self._waiting_for = None
        return Step(send=refusal, error=error)


class ServerHandshake:
    """The receiver's side: Hello in (version), Challenge out, Auth in (the sender's proof,
    then its layout), Welcome out. ``welcome`` makes the accepting reply once the sender has
    proven itself; a sender's layout must be ``layout`` or have a fingerprint in
    ``also_accepted`` (a probe has none), and a sender that skips frame checks
    (``Hello.verify`` False) is refused where ``require_verify``."""

    def __init__(
        self,
        *,
        layout: KVLayout,
        secret: bytes | None,
        nonce: bytes,
        welcome: Callable[[Hello], Welcome],
        also_accepted: Container[str] = (),
        require_verify: bool = True,
        peer: str = "the sender",
        clock: Clock = MONOTONIC,
        timeout_s: float | None = None,
    ):
        self._layout, self._secret, self._nonce, self._welcome = layout, secret, nonce, welcome
        self._require_verify = require_verify
        self._also_accepted, self._peer = also_accepted, peer
        self._hello: Hello | None = None
        self._waiting_for: type | None = Hello
        self._deadline = _Deadline(clock, timeout_s, peer)

    @property
    def read_limit(self) -> int:
        """The longest header the next message may have (an Auth may carry a whole layout)."""
        return MAX_HANDSHAKE_HEADER_BYTES if self._waiting_for is Auth else MAX_STREAM_HEADER_BYTES

    def seconds_left(self) -> float | None:
        return self._deadline.seconds_left()

    def receive(self, message) -> Step:
        if self._waiting_for is Hello and isinstance(message, Hello):
            return self._on_hello(message)
        if self._waiting_for is Auth and isinstance(message, Reject):
            self._waiting_for = None
            return Step(error=AuthenticationError(f"sender at {self._peer} refused us: {message.reason}"))
        if self._waiting_for is Auth and isinstance(message, Auth):
            return self._on_auth(message)
        if self._waiting_for is None:
            return self._refuse(RemoteProtocolError(f"{self._peer} sent a {type(message).__name__} after the handshake ended"))
        return self._refuse(_unexpected(message, self._waiting_for, self._peer))

    def _on_hello(self, hello: Hello) -> Step:
        if hello.protocol != PROTOCOL_VERSION:
            return self._refuse(
                RemoteProtocolError(f"protocol version {hello.protocol} not supported (receiver speaks {PROTOCOL_VERSION})")
            )
        self._hello = hello
        self._waiting_for = Auth
        mine = proof(self._secret, RECEIVER_LABEL, hello, self._nonce)
        return Step(send=(Challenge(PROTOCOL_VERSION, self._nonce, mine, self._layout.fingerprint),))

    def _on_auth(self, auth: Auth) -> Step:
        hello = self._hello
        if self._secret:
            if not auth.proof:
                return self._refuse(AuthenticationError("sender sent no proof, but this receiver requires a secret"))
            if not hmac.compare_digest(proof(self._secret, SENDER_LABEL, hello, self._nonce), auth.proof):
                return self._refuse(AuthenticationError("sender's proof of the shared secret is wrong (different secret)"))
        if not hello.probe and hello.fingerprint != self._layout.fingerprint and hello.fingerprint not in self._also_accepted:
            return self._refuse(LayoutMismatchError(layout_difference(self._layout, auth)))
        if not hello.probe and not hello.verify and self._require_verify:
            return self._refuse(VerifyMismatchError(
                "this receiver requires a checksum on every frame (ReceiverOptions verify=True, the default) and "
                "the sender has verify=False: set verify=False on the receiver too, only for a fabric both ends trust"
            ))
        self._waiting_for = None
        welcome = self._welcome(hello)
        return Step(send=(welcome,), accepted=Accepted(hello, PROTOCOL_VERSION, bool(self._secret), welcome))

    def _refuse(self, error: KVWireError) -> Step:
        """Tell the peer why, then fail."""
        self._waiting_for = None
        return Step(send=(Reject(kind_of(error), str(error)),), error=error)


def layout_difference(layout: KVLayout, auth: Auth) -> str:
    """Why a sender's layout (described in its Auth when the fingerprints differ) is not ours:
    the first layer and tensor that differ."""
    if auth.layout is None:
        return "layout fingerprints differ"
    try:
        theirs = KVLayout.from_description(auth.layout)
    except ValueError as exc:
        return f"sender's layout is invalid: {exc}"
    return "KV layout mismatch: " + layout.difference(theirs)
