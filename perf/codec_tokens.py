"""How often greedy tokens survive a lossy KV codec, end to end through kvwire.

For each prompt: prefill the tiny seeded hybrid model once, streaming its cache layer by
layer through a real Sender/Receiver pair with the codec; rebuild the cache from what
arrived; decode greedily. Compare the first --tokens tokens with the lossless run
(codec "none", which equals monolithic generate()). Fixed-size linear states travel
lossless under every codec; only the attention layers' per-token KV is quantized.

    python -m perf.codec_tokens --json          # 20 prompts x 64 tokens, Kimi-Linear and Qwen3-Next
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile

CODECS = ("none", "fp8", "int8", "int4")


def run(architecture: str, dtype: str, num_prompts: int, num_tokens: int, seed: int) -> dict:
    import numpy as np

    from kvwire import Receiver, Sender
    from serving.hybrid_cache import kv_layout, new_cache, rebuild_layer
    from serving.model import load, write_tiny_checkpoint
    from serving.steps import Sampling, decode, prefill

    with tempfile.TemporaryDirectory() as folder:
        loaded = load(write_tiny_checkpoint(folder, architecture, dtype=dtype, seed=seed))
    model, config = loaded.model, loaded.config
    layout = kv_layout(config, loaded.dtype_name)
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, config.vocab_size) for _ in range(rng.randrange(32, 400))] for _ in range(num_prompts)]
    outputs: dict[str, list[list[int]]] = {codec: [] for codec in CODECS}
    wire: dict[str, int] = {codec: 0 for codec in CODECS}
    with Receiver(layout) as rx, Sender(layout, rx.address, streams=2) as tx:
        for p, prompt in enumerate(prompts):
            for codec in CODECS:
                request_id = f"{codec}-{p}"
                xfer = tx.open(request_id, len(prompt), codec=codec)
                logits, _ = prefill(model, prompt, on_layer=xfer.send_layer)
                wire[codec] += xfer.finish(timeout=60).wire_bytes
                cache = new_cache(config)
                with rx.wait(request_id, timeout=10) as got:
                    for i in range(layout.num_layers):
                        rebuild_layer(cache, i, got.layer(i, timeout=10))
                first = int(logits.argmax())
                rest = decode(model, cache, first, num_tokens, Sampling(), frozenset())
                outputs[codec].append([first, *rest])
    reference = outputs["none"]
    rows = {}
    for codec in CODECS:
        prefix = [next((i for i, (a, b) in enumerate(zip(o, r, strict=True)) if a != b), num_tokens) for o, r in zip(outputs[codec], reference, strict=True)]
        rows[codec] = {
            "prompts_identical": sum(p == num_tokens for p in prefix),
            "prompts": num_prompts,
            "token_match_rate": round(float(np.mean([sum(a == b for a, b in zip(o, r, strict=True)) / num_tokens for o, r in zip(outputs[codec], reference, strict=True)])), 4),
            "mean_identical_prefix": round(float(np.mean(prefix)), 1),
            "wire_bytes_vs_none": round(wire[codec] / wire["none"], 4),
        }
    return {"architecture": architecture, "dtype": dtype, "tokens": num_tokens, "codecs": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--architectures", default="KimiLinearForCausalLM,Qwen3NextForCausalLM")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    results = [run(a, args.dtype, args.prompts, args.tokens, args.seed) for a in args.architectures.split(",")]
    report = {"benchmark": "codec_tokens", "runs": results}
    print(json.dumps(report) if args.json else json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
