"""Sends a large request over ucx in small chunks, saying "sent" after each layer: a sender
to kill at some point of its transfer.

Arguments: receiver address, request id.
"""

import sys

from kvwire import Sender
from tests.support import hybrid_layout, random_kv

layout = hybrid_layout()
with Sender(layout, sys.argv[1], backend="ucx", secret=b"test-secret", streams=2, chunk_bytes=16384) as tx:
    xfer = tx.open(sys.argv[2], 6000, timeout=20)
    for i, tensors in enumerate(random_kv(layout, 6000, seed=5)):
        xfer.send_layer(i, tensors)
        print("sent", flush=True)
    xfer.finish(timeout=20)
