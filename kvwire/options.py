"""A Sender's and a Receiver's settings as objects: one home for their defaults, checks and
meaning, with every time in seconds named ``*_s``.

``Sender(layout, address, options=SenderOptions(streams=4))`` and
``Sender(layout, address, streams=4)`` are the same; a keyword argument wins over the
same field of ``options``. Settings are checked when a Sender or Receiver takes them, so
a mistake names the constructor and the setting as the caller wrote it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .arguments import check_layout, check_positive, check_secret
from .layout import KVLayout


@dataclass(frozen=True)
class SenderOptions:
    """How a Sender connects and sends.

    backend : ``"tcp"``, ``"ucx"`` or ``"auto"`` (see ``kvwire.transport``).
    streams : connections to open; frames stripe across them (several fill long fat links
        that one TCP stream cannot). None: the first connection measures the RTT and
        ``kvwire.transport.tuning.choose`` decides from it, ``link_bandwidth_bps``,
        ``link_loss`` and this host's TCP limits (the decision and its reason:
        ``Sender.tuning``). A UCX connection stays alone (UCX spreads one endpoint over
        its own lanes: its ``Capabilities.default_streams`` is 1).
    link_bandwidth_bps, link_loss : what is known of the path, for ``streams=None``
        (unknown: 10 Gbit/s, 0.1% loss). ``TcpOptions(congestion_control="auto")`` also
        lets it pick bbr.
    secret : shared secret for the mutual HMAC handshake; AuthenticationError on mismatch.
    ssl_context : client-side TLS context.
    connect_timeout_s : to connect and complete the handshake (keyword ``timeout`` too).
    chunk_bytes : frame payload size; each frame is checksummed, and acked per layer. None:
        each ``open()`` takes 64 MiB while every connection takes CUDA memory as is (UCX
        that opened cuda_copy, on a machine with a GPU) or with ``verify=False`` over one
        connection, else 4 MiB.
    max_queued_chunks : chunks waiting for a connection; ``send_layer`` blocks beyond it
        (a layer is queued whole once there is room).
    resume_window_s : how long to keep reconnecting a dropped connection. Meanwhile requests
        go on over the other connections, and whatever was not acked is sent again, so a
        drop costs the un-acked layers, not the request. A receiver that refuses the
        connection (process gone) fails the requests at once, when no connection is left.
    transport_options : the backend's options (``TcpOptions``, ``UcxOptions``, ``AutoOptions``).
    verify : checksum every frame (xxh3, or on the GPU for CUDA memory), so that corrupted
        bytes fail the request with IntegrityError instead of reaching the engine. False
        skips it, for a fabric both ends trust; the receiver must allow it (its own
        ``verify=False``), else the handshake fails with VerifyMismatchError. What that gives
        up: bytes are then protected only by the fabric (RDMA's end-to-end ICRC; TCP's 16-bit
        checksum and Ethernet's CRC per hop), not against a flip in a NIC, switch buffer,
        PCIe or host memory on the way, and a wrong byte reaches the engine silently.
    """

    backend: str = "tcp"
    streams: int | None = None
    secret: bytes | None = field(default=None, repr=False)  # (never in a log line)
    ssl_context: Any = None
    connect_timeout_s: float = 10.0
    chunk_bytes: int | None = None
    max_queued_chunks: int = 4096
    resume_window_s: float = 10.0
    transport_options: Any = None
    link_bandwidth_bps: float | None = None
    link_loss: float | None = None
    verify: bool = True

    def checked(self, what: str = "SenderOptions", names: dict[str, str] | None = None) -> SenderOptions:
        """These options with the secret as bytes; TypeError/ValueError naming the first
        setting that is wrong (under the name the caller gave it: ``names``)."""
        said = (names or {}).get
        check_positive(what, **{said("connect_timeout_s", "connect_timeout_s"): self.connect_timeout_s},
                       max_queued_chunks=self.max_queued_chunks)
        if self.resume_window_s < 0:
            raise ValueError(f"{what}: resume_window_s must be >= 0, got {self.resume_window_s!r}")
        if self.streams is not None and not 1 <= self.streams <= 1024:
            raise ValueError(f"streams must be in 1..1024, got {self.streams}")
        if self.chunk_bytes is not None and not 4096 <= self.chunk_bytes <= 1 << 30:
            raise ValueError(f"chunk_bytes must be in 4096..2**30, got {self.chunk_bytes}")
        return dataclasses.replace(self, secret=check_secret(self.secret, what))


@dataclass(frozen=True)
class ReceiverOptions:
    """How a Receiver serves.

    backend : ``"tcp"``, ``"ucx"`` or ``"auto"``.
    secret : shared secret; senders must prove it (HMAC challenge-response) and so must we.
    ssl_context : server-side TLS context for links that leave the datacenter.
    max_bytes : memory budget for requests held at once; an Open beyond it is refused.
    max_request_timeout_s : cap on the deadline a sender may ask for.
    handshake_timeout_s : for a connection's handshake.
    resume_grace_s : how long a sender that lost every connection has to reconnect and
        resume its requests before they fail with PeerLostError.
    claim_timeout_s : free a request that completed this long ago but that nobody
        ``wait()``-ed for (its engine-side consumer vanished); None keeps it until ``release``.
    also_accepted : other layouts senders may use (a tensor-parallel peer's shard pieces):
        each session's requests take its sender's layout. ``expect`` uses the Receiver's.
    info : published to authenticated probes (``kvwire.probe``), at most 64 KiB: what a
        sender must know before it picks a layout (a decode instance's ranks, its TP).
    transport_options : the backend's options.
    verify : require a checksum on every frame (the default): a sender with ``verify=False``
        is refused in the handshake (VerifyMismatchError on both sides). False lets such
        senders skip the checks (see ``SenderOptions.verify`` for what that gives up); a
        sender that keeps ``verify=True`` is still checked.
    """

    backend: str = "tcp"
    secret: bytes | None = field(default=None, repr=False)
    ssl_context: Any = None
    max_bytes: int = 16 << 30
    max_request_timeout_s: float = 600.0
    handshake_timeout_s: float = 10.0
    resume_grace_s: float = 2.0
    claim_timeout_s: float | None = None
    also_accepted: Sequence[KVLayout] = ()
    info: bytes = b""
    transport_options: Any = None
    verify: bool = True

    def checked(self, what: str = "ReceiverOptions", names: dict[str, str] | None = None) -> ReceiverOptions:
        """These options normalized (secret and info as bytes, also_accepted as a tuple);
        TypeError/ValueError naming the first setting that is wrong."""
        if len(self.info) > 1 << 16:
            raise ValueError(f"{what}: info is {len(self.info)} bytes, at most 65536 travel in a handshake")
        check_positive(what, max_bytes=self.max_bytes, max_request_timeout_s=self.max_request_timeout_s,
                       handshake_timeout_s=self.handshake_timeout_s, claim_timeout_s=self.claim_timeout_s)
        if self.resume_grace_s < 0:
            raise ValueError(f"{what}: resume_grace_s must be >= 0, got {self.resume_grace_s!r}")
        also = tuple(check_layout(layout, f"{what} also_accepted") for layout in self.also_accepted)
        return dataclasses.replace(self, secret=check_secret(self.secret, what), info=bytes(self.info),
                                   also_accepted=also)


RENAMED = {SenderOptions: {"timeout": "connect_timeout_s"}, ReceiverOptions: {}}


def settle(cls: type, options: Any, settings: dict[str, Any], what: str) -> Any:
    """``options`` (or the defaults) with ``settings`` (the constructor's keyword arguments)
    laid over them, checked. Old names of settings are still taken."""
    if options is not None and not isinstance(options, cls):
        raise TypeError(f"{what}: options must be a kvwire.{cls.__name__}, got {type(options).__name__}")
    names = {}
    for old, new in RENAMED[cls].items():
        if old in settings:
            if new in settings:
                raise TypeError(f"{what}: give {new!r} or its old name {old!r}, not both")
            settings[new] = settings.pop(old)
            names[new] = old
    unknown = sorted(settings.keys() - {setting.name for setting in dataclasses.fields(cls)})
    if unknown:
        raise TypeError(f"{what}() got unexpected keyword arguments {unknown} (see kvwire.{cls.__name__})")
    return dataclasses.replace(options or cls(), **settings).checked(what, names)
