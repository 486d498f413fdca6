"""TTFT of disaggregated prefill: layer-wise streaming versus sending after prefill.

    python -m serving.ttft_bench --json [--lengths 1024,4096,16384] [--model DIR]

For each prompt length, in one run on the tiny model (or ``--model``): the monolithic
prefill time; the time until the decode side holds the whole cache when each layer is
sent from a forward hook as it completes (``ttft_layerwise_s``); and the same when the
whole cache is sent after the prefill (``ttft_after_prefill_s``). The receiver is a
separate process on loopback. ``transfer_after_prefill_s`` is, for both modes, the time
from the end of the forward until the receiver confirmed the last layer;
``layer_transfer_s`` is the after-prefill one scaled to the largest layer's share of the
bytes. Target: layer-wise TTFT <= monolithic prefill + one layer's transfer + 10 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from kvwire import Receiver, Sender


def _receiver(model_dir: str, secret: bytes, listen: str) -> None:
    """Child process: receive whole requests named on stdin, then release them."""
    from .hybrid_cache import kv_layout
    from .model import load

    loaded = load(model_dir)
    with Receiver(kv_layout(loaded.config, loaded.dtype_name), listen=listen, secret=secret) as rx:
        print(json.dumps({"address": rx.address}), flush=True)
        for line in sys.stdin:
            with rx.wait(line.strip(), timeout=120) as got:
                got.wait_all(timeout=120)


def _timed_prefill(loaded, prompt: list[int], sender: Sender | None, request_id: str, layerwise: bool, codec: str = "none"):
    """(seconds until the receiver holds the whole cache, seconds of that after the prefill)."""
    from .hybrid_cache import export_layer
    from .steps import prefill

    started = time.perf_counter()
    if sender is None:
        prefill(loaded.model, prompt)
        return time.perf_counter() - started, 0.0
    xfer = sender.open(request_id, len(prompt), timeout=300, codec=codec)
    if layerwise:
        _, cache = prefill(loaded.model, prompt, on_layer=xfer.send_layer)
    else:
        _, cache = prefill(loaded.model, prompt)
    computed = time.perf_counter()
    if not layerwise:
        for i in range(len(cache.layers)):
            xfer.send_layer(i, export_layer(cache, i))
    xfer.finish(timeout=300)
    done = time.perf_counter()
    return done - started, done - computed


def measure(
    model_dir: str,
    lengths: list[int],
    repeats: int = 2,
    *,
    codec: str = "none",
    receiver_prefix: list[str] | None = None,
    listen: str = "127.0.0.1:0",
    streams: int | None = 4,
) -> dict:
    """The benchmark's JSON document: one point per prompt length (best of ``repeats``).

    ``receiver_prefix`` (e.g. ``ip netns exec NS``) starts the receiver elsewhere, such as
    the far side of an emulated WAN link, listening on ``listen``.
    """
    import numpy as np

    from .hybrid_cache import kv_layout
    from .model import load

    loaded = load(model_dir)
    layout = kv_layout(loaded.config, loaded.dtype_name)
    secret = os.urandom(16).hex().encode()
    child = subprocess.Popen([*(receiver_prefix or []), sys.executable, "-m", "serving.ttft_bench", "--receiver", model_dir, "--listen", listen],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env={**os.environ, "KVWIRE_BENCH_SECRET": secret.decode()})
    try:
        address = json.loads(child.stdout.readline())["address"]
        sender = Sender(layout, address, secret=secret, streams=streams)
        points = []
        rng = np.random.default_rng(0)
        _timed_prefill(loaded, rng.integers(3, loaded.config.vocab_size, 64).tolist(), None, "", False)  # warm-up
        for n in lengths:
            prompt = rng.integers(3, loaded.config.vocab_size, n).tolist()
            best = {"mono": (float("inf"), 0.0), "layerwise": (float("inf"), 0.0), "after": (float("inf"), 0.0)}
            for r in range(repeats):
                best["mono"] = min(best["mono"], _timed_prefill(loaded, prompt, None, "", False))
                for mode in ("layerwise", "after"):
                    request_id = f"{mode}-{n}-{r}"
                    child.stdin.write(request_id + "\n")
                    child.stdin.flush()
                    best[mode] = min(best[mode], _timed_prefill(loaded, prompt, sender, request_id, mode == "layerwise", codec))
            plans = layout.plans(n)
            largest_share = max(plan.nbytes for plan in plans) / sum(plan.nbytes for plan in plans)
            points.append({
                "tokens": n, "monolithic_prefill_s": best["mono"][0], "ttft_layerwise_s": best["layerwise"][0],
                "ttft_after_prefill_s": best["after"][0], "kv_bytes": layout.nbytes(n),
                "layer_transfer_s": best["after"][1] * largest_share,
                "transfer_after_prefill_s": {"layerwise": best["layerwise"][1], "after_prefill": best["after"][1]},
            })
        sender.close()
        return {"model": model_dir, "architecture": loaded.architecture, "dtype": loaded.dtype_name, "codec": codec, "points": points}
    finally:
        child.stdin.close()
        child.wait(30)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serving.ttft_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint folder (default: the demo's tiny Kimi-Linear)")
    parser.add_argument("--lengths", default="1024,4096,16384")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="print JSON (the only output format)")
    parser.add_argument("--codec", default="none", help="KV codec on the wire (none, fp8, int8, int4)")
    parser.add_argument("--streams", type=int, default=4, help="kvwire connections (0: tuned from the link)")
    parser.add_argument("--receiver-netns", help="run the receiver in this network namespace")
    parser.add_argument("--listen", default="127.0.0.1:0", help="the receiver's address")
    parser.add_argument("--receiver", metavar="DIR", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    from .model import quiet_transformers

    quiet_transformers()
    if args.receiver:
        _receiver(args.receiver, os.environ["KVWIRE_BENCH_SECRET"].encode(), args.listen)
        return 0
    from .demo import tiny_model_dir

    model_dir = args.model or str(tiny_model_dir())
    prefix = ["ip", "netns", "exec", args.receiver_netns] if args.receiver_netns else None
    result = measure(
        model_dir, [int(n) for n in args.lengths.split(",") if n], args.repeats,
        codec=args.codec, receiver_prefix=prefix, listen=args.listen, streams=args.streams or None,
    )
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
