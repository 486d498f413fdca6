"""The exception tree: every failure kvwire raises on purpose is a KVWireError.

Shape or dtype mistakes in arguments are plain ValueErrors, as in numpy and torch.
"""

import copy


class KVWireError(Exception):
    """Base class of every kvwire transfer error.

    Beside its message, an error carries what code needs to act on it without reading
    the text: the ``request_id``, ``layer`` and ``chunk`` it concerns and the ``peer``
    (where known, else None); ``refused``, the peer's host actively refused the
    connection (nothing listens there: a retry will not help until something does); and
    ``remote``, the peer made the error (it said so in an Abort or Reject, or its bytes
    broke the protocol) rather than this side.
    """

    remote = False

    def __init__(
        self,
        message: str = "",
        *,
        request_id: str | None = None,
        layer: int | None = None,
        chunk: int | None = None,
        peer: str | None = None,
        refused: bool = False,
        remote: bool | None = None,
    ):
        super().__init__(message)
        self.request_id, self.layer, self.chunk, self.peer, self.refused = request_id, layer, chunk, peer, refused
        if remote is not None:
            self.remote = remote


class LayoutMismatchError(KVWireError):
    """Sender and receiver (or an array and its layout) disagree on the KV layout."""


class AuthenticationError(KVWireError):
    """The peer did not prove knowledge of the shared secret, or refused ours."""


class IntegrityError(KVWireError):
    """A frame's checksum did not match: the request's data cannot be trusted."""


class PeerLostError(KVWireError):
    """The connection to the peer broke (process died, reset, or closed) mid-request."""


class TransferTimeout(KVWireError, TimeoutError):
    """A deadline passed before the transfer (or the awaited part of it) completed."""


class ProtocolError(KVWireError):
    """Bytes or messages that break the kvwire protocol (which side: the subclass)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent bytes that are not a valid kvwire message at this point."""

    remote = True


class LocalProtocolError(ProtocolError):
    """This side could not say what it meant within the protocol (a frame it failed to
    build): a kvwire bug or an engine array it cannot read, never the peer's fault."""


class VerifyMismatchError(KVWireError):
    """The two ends disagree on checking frames: a sender with ``verify=False`` met a
    receiver that requires a checksum on every frame (``ReceiverOptions.verify=True``)."""


class RequestRejected(KVWireError):
    """The receiver refused to open a request (duplicate id, memory budget, bad buffers)."""


class TransferAborted(KVWireError):
    """The other side aborted the request (it said why)."""


# Errors that mean the two ends are misconfigured (another secret, model or protocol), not
# that a transfer was unlucky: retrying or recomputing would only hide them.
MISCONFIGURATIONS = (AuthenticationError, LayoutMismatchError, ProtocolError, VerifyMismatchError)


# Error kinds as they travel in Abort/Reject messages, mapped back to classes in one place.
ERROR_KINDS: dict[str, type[KVWireError]] = {
    "layout": LayoutMismatchError,
    "auth": AuthenticationError,
    "integrity": IntegrityError,
    "peer_lost": PeerLostError,
    "timeout": TransferTimeout,
    "protocol": ProtocolError,
    "rejected": RequestRejected,
    "verify": VerifyMismatchError,
    "aborted": TransferAborted,
}


def kind_of(error: BaseException) -> str:
    """The wire name of an error's class ("aborted" for anything unknown)."""
    for kind, cls in ERROR_KINDS.items():
        if isinstance(error, cls):
            return kind
    return "aborted"


def remembered(error: KVWireError) -> KVWireError:
    """``error`` as a failed request keeps it: without the frames it was raised through
    (or the exceptions it was raised while handling), which hold those frames' arrays."""
    error.__traceback__ = error.__context__ = error.__cause__ = None
    return error


def again(error: KVWireError) -> KVWireError:
    """A remembered error, to raise once more: a copy. Raising the kept object itself
    would chain each raiser's frames, and every array in them, to it for as long as it
    is remembered (a soak's receiver grew by ~0.7 MiB a failed transfer)."""
    return copy.copy(error)


def error_from_kind(kind: str, message: str, **fields) -> KVWireError:
    """Rebuild an error the peer reported (``remote``); unknown kinds become TransferAborted."""
    cls = RemoteProtocolError if kind == "protocol" else ERROR_KINDS.get(kind, TransferAborted)
    return cls(message, remote=True, **fields)
