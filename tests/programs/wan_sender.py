"""The other side of the emulated WAN link: sends request r0 over 4 streams and prints its
time and the links' RTTs as JSON.

Arguments: the receiver's address (no port).
"""

import json
import sys

import numpy as np

from kvwire import KVLayout, Sender, TensorSpec

layout = KVLayout([{"kv": TensorSpec((4, 64), "float32", per_token=True)} for _ in range(4)])
with Sender(layout, sys.argv[1] + ":7800", streams=4, secret=b"wan") as tx:
    xfer = tx.open("r0", 2048, timeout=30)
    for i in range(4):
        xfer.send_layer(i, {"kv": np.full((2048, 4, 64), i + 1, dtype=np.float32)})
    stats = xfer.finish(timeout=30)
    print(json.dumps({"seconds": stats.seconds, "rtt_ms": [link.min_rtt_ms for link in tx.metrics().links]}), flush=True)
