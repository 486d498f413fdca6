"""GPU check of the codec kernels (run on a machine with an NVIDIA GPU; part of gpu_check.sh).

For a GQA layer (8 KV heads x 128, bf16) and a Kimi-like MLA latent (512, bf16) at 32K
tokens in 16-token pages with shuffled block ids: fused gather+quantize and
dequantize+scatter per codec, timed with CUDA events, next to a device-to-device copy of
the same bytes in the same run; codes and scales checked against the CPU path bit for bit.

    python -m perf.gpu_codec --json
    NUMBA_ENABLE_CUDASIM=1 python -m perf.gpu_codec --device cpu --json   # a dry run, no GPU
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from perf import devices


def unavailable() -> str | None:
    return None if devices.cuda_available() else "needs a CUDA GPU (torch sees none)"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", type=int, default=None, help="default 32768 (16 for --device cpu)")
    ap.add_argument("--device", choices=["cuda", "cpu"], default=devices.default_device(),
                    help="cpu: a dry run of the same code in host memory (needs NUMBA_ENABLE_CUDASIM=1)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    import torch

    from kvwire import device
    from kvwire.codecs import bits_to_float32, get_codec
    from kvwire.cuda import ops
    from kvwire.cuda.compat import cuda

    if args.device == "cpu" and not device.simulated():
        ap.error("--device cpu runs the kernels in numba's CUDA simulator: set NUMBA_ENABLE_CUDASIM=1")
    block, tokens = 16, args.tokens or (16 if args.device == "cpu" else 32768)
    # The simulator runs every CUDA thread in Python (seconds a launch): a dry run takes
    # small heads and one codec per layer.
    shapes = ((("gqa", 8, 128), ("fp8", "int8", "int4")), (("mla", 1, 512), ("fp8", "int8", "int4")))
    if args.device == "cpu":
        shapes = ((("gqa", 2, 16), ("int4",)), (("mla", 1, 32), ("fp8",)))
    rows_out = []
    for (layer, heads, dim), codecs in shapes:
        num_blocks = 2 * tokens // block
        pool = torch.randn(num_blocks, block, heads, dim, device=args.device).to(torch.bfloat16)
        ids = torch.randperm(num_blocks)[: tokens // block]
        rows = (ids[:, None] * block + torch.arange(block)).reshape(-1)[:tokens].numpy()
        device_rows = cuda.to_device(rows)
        bits = ops.device_rows(pool, num_blocks * block, "bfloat16", encoded=True)
        nbytes = tokens * heads * dim * 2
        copy_src = torch.empty(nbytes, dtype=torch.uint8, device=args.device)
        copy_dst = torch.empty_like(copy_src)

        def timed(fn, repeats=5):
            best = float("inf")
            for _ in range(repeats if args.device == "cuda" else 1):
                if args.device == "cpu":  # (the simulator's seconds mean nothing; the code ran)
                    started = time.perf_counter()
                    fn()
                    best = min(best, time.perf_counter() - started)
                    continue
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                best = min(best, start.elapsed_time(end) / 1000)
            return best

        d2d = timed(lambda: copy_dst.copy_(copy_src))
        host_pool = pool.view(torch.uint16).cpu().numpy()
        x = bits_to_float32(host_pool.reshape(-1).view(np.uint8), "bfloat16").reshape(-1, heads, dim)[rows]
        for codec in codecs:
            encode_s = timed(lambda: ops.gather_quantize(bits, "bfloat16", device_rows, codec, heads, dim))
            codes, scales = ops.gather_quantize(bits, "bfloat16", device_rows, codec, heads, dim)
            ref_codes, ref_scales = get_codec(codec).encode(x)
            identical = (
                codes.copy_to_host().tobytes() == ref_codes.tobytes()
                and scales.copy_to_host().tobytes() == ref_scales.tobytes()
            )
            out = torch.zeros_like(pool)
            out_bits = ops.device_rows(out, num_blocks * block, "bfloat16", encoded=True)
            decode_s = timed(
                lambda: ops.dequantize_scatter(codes, scales, codec, heads, dim, device_rows, out_bits, "bfloat16")
            )
            rows_out.append(
                {
                    "layer": layer,
                    "tokens": tokens,
                    "codec": codec,
                    "identical_to_cpu": identical,
                    "encode_gbps": round(nbytes / encode_s / 1e9, 1),
                    "decode_gbps": round(nbytes / decode_s / 1e9, 1),
                    "d2d_copy_gbps": round(nbytes / d2d / 1e9, 1),
                    "encode_vs_d2d": round(d2d / encode_s, 3),
                    "decode_vs_d2d": round(d2d / decode_s, 3),
                }
            )
    gpu = torch.cuda.get_device_name(0) if args.device == "cuda" else "none"
    report = {"gpu_check": "kvwire codec kernels", "device": args.device, "gpu": gpu, "rows": rows_out}
    if args.device == "cpu":
        report["dry_run"] = devices.DRY_RUN_NOTE
    if not all(row["identical_to_cpu"] for row in rows_out):
        report["error"] = "the kernels' codes or scales differ from the CPU path"
    print(json.dumps(report) if args.json else json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
