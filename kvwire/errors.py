"""The exception tree: every failure kvwire raises on purpose is a KVWireError.

Shape or dtype mistakes in arguments are plain ValueErrors, as in numpy and torch.
"""

import copy


class KVWireError(Exception):
    """Base class of every kvwire transfer error."""


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
    """The peer sent bytes that are not a valid kvwire message at this point."""


class RequestRejected(KVWireError):
    """The receiver refused to open a request (duplicate id, memory budget, bad buffers)."""


class TransferAborted(KVWireError):
    """The other side aborted the request (it said why)."""


# Errors that mean the two ends are misconfigured (another secret, model or protocol), not
# that a transfer was unlucky: retrying or recomputing would only hide them.
MISCONFIGURATIONS = (AuthenticationError, LayoutMismatchError, ProtocolError)


# Error kinds as they travel in Abort/Reject messages, mapped back to classes in one place.
ERROR_KINDS: dict[str, type[KVWireError]] = {
    "layout": LayoutMismatchError,
    "auth": AuthenticationError,
    "integrity": IntegrityError,
    "peer_lost": PeerLostError,
    "timeout": TransferTimeout,
    "protocol": ProtocolError,
    "rejected": RequestRejected,
    "aborted": TransferAborted,
}


def kind_of(error: BaseException) -> str:
    """The wire name of an error's class ("aborted" for anything unknown)."""
    for kind, cls in ERROR_KINDS.items():
        if type(error) is cls:
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


def error_from_kind(kind: str, message: str) -> KVWireError:
    """Rebuild an error received from the peer; unknown kinds become TransferAborted."""
    return ERROR_KINDS.get(kind, TransferAborted)(message)
