"""Every message kvwire puts on the wire, as msgspec Structs (MessagePack, never pickle).

Every length, count and index is bounded here, so that decoding hostile bytes fails
with a ValidationError naming the field instead of allocating without limit.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

import msgspec
from msgspec import Meta

PROTOCOL_VERSION = 7  # 2: Data.algorithm; 3: Hello.probe, Welcome.info; 4: Hello.verify, algorithm "none"; 5: Layers; 6: Acks;
# 7: UCX control messages of up to 1 MiB (kvwire.transport.ucx.control)

Name = Annotated[str, Meta(min_length=1, max_length=256)]
Reason = Annotated[str, Meta(max_length=4096)]
Nonce = Annotated[bytes, Meta(min_length=16, max_length=64)]
Proof = Annotated[bytes, Meta(max_length=64)]
Index = Annotated[int, Meta(ge=0, le=2**31)]
Count = Annotated[int, Meta(ge=0, le=2**40)]
RequestNumber = Annotated[int, Meta(ge=0, le=2**62)]
Seconds = Annotated[float, Meta(gt=0, le=7 * 24 * 3600)]
MAX_JOINED_LAYERS = 4096


class _Message(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True, tag_field="t"):
    pass


class TensorDesc(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    name: Name
    shape: Annotated[list[Annotated[int, Meta(ge=0, le=2**40)]], Meta(max_length=16)]
    dtype: Annotated[str, Meta(max_length=32)]
    per_token: bool


class LayerDesc(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    tensors: Annotated[list[TensorDesc], Meta(max_length=1 << 20)]


# -- handshake: Hello -> Challenge -> Auth -> Welcome | Reject ---------------------------


class Hello(_Message, tag="hello"):
    """Sender opens a stream: who it is, which stream of its session, its layout's hash."""

    protocol: int
    session_id: Annotated[bytes, Meta(min_length=16, max_length=16)]
    stream_index: Annotated[int, Meta(ge=0, le=1024)]
    num_streams: Annotated[int, Meta(ge=1, le=1024)]
    fingerprint: Annotated[str, Meta(max_length=64)]
    nonce: Nonce
    resume: bool = False  # replaces a lost stream of a session the receiver may still hold
    probe: bool = False  # only asks for the receiver's published info (no layout, no session)
    verify: bool = True  # False: this sender skips the frame checksums (accepted only where the receiver allows it)


class Challenge(_Message, tag="challenge"):
    """Receiver's nonce, its proof of the secret over the sender's nonce, its layout hash."""

    protocol: int
    nonce: Nonce
    proof: Proof
    fingerprint: Annotated[str, Meta(max_length=64)]


class Auth(_Message, tag="auth"):
    """Sender's proof; carries its full layout only when the fingerprints differ."""

    proof: Proof
    layout: Union[Annotated[list[LayerDesc], Meta(max_length=1 << 16)], None] = None


class Welcome(_Message, tag="welcome"):
    """Handshake accepted; the receiver's limits, so the sender can refuse early, and
    whether it still holds the session (the requests a resumed stream continues)."""

    max_request_bytes: Count
    session_known: bool = False
    info: Annotated[bytes, Meta(max_length=1 << 16)] = b""  # what the receiver publishes, to probes


class Reject(_Message, tag="reject"):
    """Handshake refused; ``kind`` names the error class (see errors.ERROR_KINDS)."""

    kind: Annotated[str, Meta(max_length=32)]
    reason: Reason


# -- data phase --------------------------------------------------------------------------


class Open(_Message, tag="open"):
    """A new request in this session. Sent on every stream ahead of its data frames."""

    rid: RequestNumber
    request_id: Name
    num_tokens: Count
    codec: Annotated[str, Meta(max_length=32)]
    chunk_bytes: Annotated[int, Meta(ge=4096, le=1 << 30)]
    timeout_s: Seconds


class Data(_Message, tag="data"):
    """One chunk of a layer's byte stream; ``nbytes`` of payload follow the header."""

    rid: RequestNumber
    layer: Index
    chunk: Index
    nbytes: Annotated[int, Meta(ge=0, le=1 << 30)]
    checksum: int  # of header fields and payload, by ``algorithm``
    # "xxh3": wire.checksum, over host memory; "blocksum": wire.blocksum, which a GPU
    # computes where the data is (a sender's CUDA tensors over UCX); "none": not checked
    # (checksum 0), only in a session whose handshake agreed to skip checks (verify=False)
    algorithm: Literal["xxh3", "blocksum", "none"] = "xxh3"


class Layers(_Message, tag="layers"):
    """Several small layers of one request, each whole (one chunk), in one frame: their
    byte streams follow the header in the order of ``layers``, ``nbytes`` in all. One
    header, one checksum (``wire.checksum.layers_checksum``) and one receive for them:
    a hybrid model's states and a short prompt's KV are many layers of a few KiB each."""

    rid: RequestNumber
    layers: Annotated[list[Index], Meta(min_length=2, max_length=MAX_JOINED_LAYERS)]
    nbytes: Annotated[int, Meta(ge=0, le=1 << 30)]
    checksum: int
    algorithm: Literal["xxh3", "none"] = "xxh3"


class Ack(_Message, tag="ack"):
    """Receiver verified every chunk of ``layer``."""

    rid: RequestNumber
    layer: Index


class Acks(_Message, tag="acks"):
    """Receiver verified each of ``layers`` (a ``Layers`` frame's): one message for them,
    read once by the sender, not one Ack each."""

    rid: RequestNumber
    layers: Annotated[list[Index], Meta(min_length=1, max_length=MAX_JOINED_LAYERS)]


class Abort(_Message, tag="abort"):
    """Either side gives up on a request; ``kind`` names the error class."""

    rid: RequestNumber
    kind: Annotated[str, Meta(max_length=32)]
    reason: Reason


HandshakeMessage = Union[Hello, Challenge, Auth, Welcome, Reject]
StreamMessage = Union[Open, Data, Layers, Ack, Acks, Abort]
