"""Ask a Receiver what it publishes (``Receiver(info=...)``) before choosing how to send.

A prefill rank cannot pick its layout until it knows the decode instance: its
tensor-parallel size, its ranks' addresses, its geometry. ``probe`` runs the handshake's
mutual proof of the secret without a layout and returns the receiver's info, the way
NIXL's agents exchange metadata before any transfer; nothing else is sent.
"""

from __future__ import annotations

import os

from .address import check_address
from .arguments import check_positive, check_secret
from .handshake import client_handshake
from .transport import get_backend


def probe(address: str, *, backend: str = "tcp", secret: bytes | None = None, ssl_context=None,
          timeout: float = 10.0) -> bytes:
    """The info the Receiver at ``address`` publishes (b"" if none). Raises what a
    Sender's handshake raises: AuthenticationError, ProtocolError (not kvwire), PeerLostError."""
    check_address(address, what="probe address")
    secret = check_secret(secret, "probe")
    check_positive("probe", timeout=timeout)
    conn = get_backend(backend).connect(address, timeout_s=timeout, ssl_context=ssl_context, options=None)
    try:
        welcome = client_handshake(conn, layout=None, secret=secret, session_id=os.urandom(16), stream_index=0,
                                   num_streams=1, timeout_s=timeout)
    finally:
        conn.close()
    return welcome.info
