"""bfloat16 and fp8 tensors round trip as their raw bits where ml_dtypes is not installed;
prints "ok"."""

import sys

sys.modules["ml_dtypes"] = None  # as on an install with only kvwire's own dependencies

import numpy as np

from kvwire import KVLayout, Receiver, Sender, TensorSpec

layout = KVLayout([{"k": TensorSpec((4,), "bfloat16", per_token=True), "s": TensorSpec((3,), "float8_e4m3fn")}])
k = np.arange(20, dtype=np.uint16).reshape(5, 4)  # raw bfloat16 bits
s = np.array([1, 2, 255], dtype=np.uint8)  # raw e4m3 bits
with Receiver(layout) as rx, Sender(layout, rx.address) as tx:
    x = tx.open("r", 5)
    x.send_layer(0, {"k": k, "s": s})
    x.finish(timeout=10)
    got = rx.wait("r", timeout=10).layer(0)
assert got["k"].dtype == np.uint16 and got["k"].tobytes() == k.tobytes()
assert got["s"].dtype == np.uint8 and got["s"].tobytes() == s.tobytes()
print("ok")
