"""Sends one request over ucx from its own process and prints the connections' transports.

Arguments: receiver address.
"""

import sys

from kvwire import Sender
from tests.support import hybrid_layout, random_kv

layout = hybrid_layout()
with Sender(layout, sys.argv[1], backend="ucx", secret=b"test-secret", streams=2) as tx:
    xfer = tx.open("net", 300)
    for i, tensors in enumerate(random_kv(layout, 300, seed=4)):
        xfer.send_layer(i, tensors)
    xfer.finish(timeout=20)
    print(",".join(conn.transport for conn in tx.connections), flush=True)
