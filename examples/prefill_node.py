"""Prefill node: "computes" each layer, then hands it to kvwire at once (layer-wise pipelining).

    python examples/prefill_node.py --decode 10.0.0.2:7800 --secret-file secret.txt --tokens 8192

The compute of layer i+1 (emulated by --layer-ms of sleep) overlaps the transfer of
layer i, which is the point of layer-wise sending: the KV is mostly on the wire by the
time the last layer is computed.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from synthetic_kv import kimi_like_layout, layer_kv  # noqa: E402

from kvwire import Sender  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--decode", required=True, help="the decode node's kvwire address HOST:PORT")
    ap.add_argument("--secret-file", type=Path)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1024, 8192, 32768, 4096])
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--layer-ms", type=float, default=20.0, help="emulated compute time per layer")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="prefill %(levelname)s %(name)s: %(message)s")
    secret = args.secret_file.read_bytes().strip() if args.secret_file else None
    layout = kimi_like_layout()
    with Sender(layout, args.decode, streams=args.streams, secret=secret) as tx:
        for n, num_tokens in enumerate(args.tokens):
            request_id = f"req-{n}"
            kv = [layer_kv(layout, request_id, i, num_tokens) for i in range(layout.num_layers)]
            start = time.monotonic()
            xfer = tx.open(request_id, num_tokens)
            for i, tensors in enumerate(kv):
                time.sleep(args.layer_ms / 1000)  # the model computing layer i
                xfer.send_layer(i, tensors)
            computed = time.monotonic() - start
            stats = xfer.finish(timeout=60)
            done = time.monotonic() - start  # both from the same clock: the tail is never negative
            print(json.dumps({
                "request": request_id, "tokens": num_tokens, "raw_bytes": stats.raw_bytes,
                "prefill_ms": round(computed * 1000, 1), "done_ms": round(done * 1000, 1),
                "tail_after_prefill_ms": round((done - computed) * 1000, 1),
                "goodput_gbps": round(stats.goodput_gbps, 3),
            }), flush=True)
        m = tx.metrics()
        print(json.dumps({"peer": m.peer, "rtt_ms": m.rtt_ms, "retransmits": m.retransmits}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
