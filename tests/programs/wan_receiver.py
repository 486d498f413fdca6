"""One side of the emulated WAN link: receives request r0 on port 7800 and prints each
layer's sum as JSON.

Arguments: the address to listen on (no port).
"""

import json
import sys

from kvwire import KVLayout, Receiver, TensorSpec

layout = KVLayout([{"kv": TensorSpec((4, 64), "float32", per_token=True)} for _ in range(4)])
rx = Receiver(layout, sys.argv[1] + ":7800", secret=b"wan")
print("ready", flush=True)
got = rx.wait("r0", timeout=30)
layers = [got.wait_layer(i, timeout=30)["kv"] for i in range(4)]
print(json.dumps({"sums": [float(a.sum()) for a in layers]}), flush=True)
got.release()
rx.close()
