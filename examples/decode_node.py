"""Decode node: receives KV layer by layer and checks every byte.

    python examples/decode_node.py --listen 0.0.0.0:7800 --secret-file secret.txt --requests 4

Prints one JSON line per request: tokens, bytes, when each layer became usable
(relative to the request's open), and whether every byte matched.
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

from kvwire import KVWireError, Receiver  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--listen", default="127.0.0.1:7800")
    ap.add_argument("--secret-file", type=Path)
    ap.add_argument("--requests", type=int, default=4, help="exit after this many requests")
    ap.add_argument("--timeout", type=float, default=60.0)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="decode %(levelname)s %(name)s: %(message)s")
    secret = args.secret_file.read_bytes().strip() if args.secret_file else None
    layout = kimi_like_layout()
    ok = True
    with Receiver(layout, listen=args.listen, secret=secret) as rx:
        print(json.dumps({"listening": rx.address}), flush=True)
        for n in range(args.requests):
            request_id = f"req-{n}"
            try:
                with rx.wait(request_id, timeout=args.timeout) as got:
                    opened = time.monotonic()
                    arrivals, matched = [], True
                    for i in range(got.num_layers):
                        tensors = got.wait_layer(i, timeout=args.timeout)
                        arrivals.append(round((time.monotonic() - opened) * 1000, 2))
                        expected = layer_kv(layout, request_id, i, got.num_tokens)
                        matched &= all(tensors[k].tobytes() == expected[k].tobytes() for k in expected)
                    print(json.dumps({
                        "request": request_id, "tokens": got.num_tokens, "bytes": layout.nbytes(got.num_tokens),
                        "layer_ready_ms": arrivals, "bytes_match": matched,
                    }), flush=True)
                    ok &= matched
            except KVWireError as exc:
                print(json.dumps({"request": request_id, "error": f"{type(exc).__name__}: {exc}"}), flush=True)
                ok = False
        for peer, m in rx.metrics().items():
            print(json.dumps({"peer": peer, "bytes": m.bytes, "goodput_gbps": round(m.goodput_bps / 1e9, 3)}), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
