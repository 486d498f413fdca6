"""kvwire: KV cache transport for prefill/decode disaggregated serving, across datacenters."""

import logging

from .errors import (
    AuthenticationError,
    IntegrityError,
    KVWireError,
    LayoutMismatchError,
    LocalProtocolError,
    PeerLostError,
    ProtocolError,
    RemoteProtocolError,
    RequestRejected,
    TransferAborted,
    TransferTimeout,
    VerifyMismatchError,
)
from .inbound import ReceivedRequest
from .layout import KVLayout, TensorSpec
from .metrics import PeerMetrics
from .options import ReceiverOptions, SenderOptions
from .outbound import Transfer, TransferStats
from .probe import probe
from .receiver import Receiver
from .sender import Sender

logging.getLogger(__name__).addHandler(logging.NullHandler())

__version__ = "0.1.0"

__all__ = [
    "AuthenticationError",
    "IntegrityError",
    "KVLayout",
    "KVWireError",
    "LayoutMismatchError",
    "LocalProtocolError",
    "PeerLostError",
    "PeerMetrics",
    "ProtocolError",
    "ReceivedRequest",
    "Receiver",
    "ReceiverOptions",
    "RemoteProtocolError",
    "RequestRejected",
    "Sender",
    "SenderOptions",
    "TensorSpec",
    "Transfer",
    "TransferAborted",
    "TransferStats",
    "TransferTimeout",
    "VerifyMismatchError",
    "probe",
]
