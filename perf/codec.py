"""CPU throughput of paged gather+quantize and dequantize+scatter per codec, against memcpy.

For a Kimi-Linear-like MLA layer (latent 512 + rope 64, one "head") and a GQA layer
(8 KV heads x 128, K and V) at 4K and 32K tokens, in vLLM-style pools of 16-token
blocks with shuffled block ids. Throughput is GB/s of the layer's bf16 input; memcpy is
a plain copy of the same bytes, timed in the same run. Best of --repeats.

    python -m perf.codec --json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import ml_dtypes
import numpy as np

from kvwire import TensorSpec
from kvwire import paged
from kvwire.codecs import bits_to_float32, float32_to_bits, geometry, get_codec

BLOCK = 16
LAYERS = {
    "mla": {
        "latent": TensorSpec((1, 512), "bfloat16", per_token=True),
        "rope": TensorSpec((1, 64), "bfloat16", per_token=True),
    },
    "gqa": {
        "k": TensorSpec((8, 128), "bfloat16", per_token=True),
        "v": TensorSpec((8, 128), "bfloat16", per_token=True),
    },
}


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def bench_layer(layer: str, tokens: int, codec_name: str, repeats: int, rng) -> dict:
    specs = LAYERS[layer]
    num_blocks = -(-tokens // BLOCK)
    ids = rng.permutation(num_blocks * 2)[:num_blocks]  # scattered through a pool twice the size
    pools = {
        n: rng.standard_normal((num_blocks * 2, BLOCK, *s.shape)).astype(ml_dtypes.bfloat16) for n, s in specs.items()
    }
    dest_pools = {n: np.zeros_like(p) for n, p in pools.items()}
    dest_ids = rng.permutation(num_blocks * 2)[:num_blocks]
    codec = get_codec(codec_name)
    raw = sum(s.nbytes(tokens) for s in specs.values())
    wire: dict[str, list] = {}

    def encode():
        for name, spec in specs.items():
            gathered = paged.gather(pools[name], ids, tokens, spec, name)
            if codec is None:
                wire[name] = [gathered]
                continue
            heads, dim = geometry(spec.shape)
            wire[name] = codec.encode(bits_to_float32(gathered, "bfloat16").reshape(tokens, heads, dim), name)

    def decode():
        for name, spec in specs.items():
            rows_view, nb, bs = paged.pool_rows_view(dest_pools[name], spec, name)
            rows = paged.token_rows(dest_ids, bs, tokens, nb, name)
            if codec is None:
                bits = wire[name][0]
            else:
                heads, dim = geometry(spec.shape)
                bits = float32_to_bits(codec.decode(wire[name], tokens, heads, dim), "bfloat16")
            rows_view[rows] = bits.reshape(tokens, -1)

    source = np.concatenate(
        [p.reshape(-1).view(np.uint8)[: s.nbytes(tokens)] for p, s in zip(pools.values(), specs.values())]
    )
    target = np.empty_like(source)
    memcpy_s = best(lambda: np.copyto(target, source), repeats)
    encode_s = best(encode, repeats)
    decode_s = best(decode, repeats)
    wire_bytes = sum(part.nbytes for parts in wire.values() for part in parts)
    err = 0.0
    for name, spec in specs.items():
        rows = (dest_ids[:, None] * BLOCK + np.arange(BLOCK)).reshape(-1)[:tokens]
        src_rows = (ids[:, None] * BLOCK + np.arange(BLOCK)).reshape(-1)[:tokens]
        got = dest_pools[name].reshape(-1, *spec.shape)[rows].astype(np.float32)
        sent = pools[name].reshape(-1, *spec.shape)[src_rows].astype(np.float32)
        err = max(err, float(np.abs(got - sent).max()))
    return {
        "layer": layer,
        "tokens": tokens,
        "codec": codec_name,
        "encode_gbps": round(raw / encode_s / 1e9, 3),
        "decode_gbps": round(raw / decode_s / 1e9, 3),
        "memcpy_gbps": round(raw / memcpy_s / 1e9, 3),
        "wire_ratio": round(wire_bytes / raw, 4),
        "max_abs_err": err,
    }


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = sorted({(r["layer"], r["tokens"]) for r in rows})
    codecs = ["none", "int8", "fp8", "int4"]
    fig, axes = plt.subplots(1, len(cases), figsize=(4 * len(cases), 3.6), sharey=True)
    for ax, (layer, tokens) in zip(np.atleast_1d(axes), cases):
        sel = {r["codec"]: r for r in rows if (r["layer"], r["tokens"]) == (layer, tokens)}
        x = np.arange(len(codecs))
        ax.bar(x - 0.2, [sel[c]["encode_gbps"] for c in codecs], 0.4, label="gather+quantize")
        ax.bar(x + 0.2, [sel[c]["decode_gbps"] for c in codecs], 0.4, label="dequantize+scatter")
        ax.axhline(sel["none"]["memcpy_gbps"], color="k", ls="--", lw=1, label="memcpy")
        ax.set_xticks(x, [f"{c}\n{sel[c]['wire_ratio']:.2f}x" for c in codecs])
        ax.set_title(f"{layer}, {tokens // 1024}K tokens")
    np.atleast_1d(axes)[0].set_ylabel("GB/s of bf16 input (CPU)")
    np.atleast_1d(axes)[0].legend(fontsize=7)
    fig.suptitle(f"kvwire codecs on {os.cpu_count()} CPU cores (label: wire bytes / bf16 bytes)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[4096, 32768])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="CI-sized: 1K tokens, one repeat")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.tokens, args.repeats = [1024], 1
    rng = np.random.default_rng(0)
    rows = [
        bench_layer(layer, tokens, codec, args.repeats, rng)
        for layer in LAYERS
        for tokens in args.tokens
        for codec in ("none", "int8", "fp8", "int4")
    ]
    result = {
        "benchmark": "codec",
        "rows": rows,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "note": "CPU path (numpy); the CUDA kernels need a GPU machine: see kvwire/cuda and perf/gpu_check.sh",
    }
    print(json.dumps(result) if args.json else json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
