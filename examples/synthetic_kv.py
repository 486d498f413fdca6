"""A Kimi-Linear-shaped KV layout and deterministic per-request KV, shared by both nodes.

Both sides can regenerate a request's KV from its id, so the decode node can check
every byte it received without any side channel.
"""

from __future__ import annotations

import zlib

import numpy as np

from kvwire import KVLayout, TensorSpec

NUM_LAYERS = 8  # KDA, KDA, KDA, MLA, KDA, KDA, KDA, MLA
NUM_HEADS, HEAD_DIM, CONV_DIM, KV_LORA_RANK, ROPE_DIM = 4, 64, 4 * 4 * 64 * 3, 128, 32


def kimi_like_layout() -> KVLayout:
    layers = []
    for i in range(NUM_LAYERS):
        if i % 4 == 3:  # full attention (MLA): per-token latent + shared rope key
            layers.append({
                "latent": TensorSpec((1, KV_LORA_RANK), "bfloat16", per_token=True),
                "rope": TensorSpec((1, ROPE_DIM), "bfloat16", per_token=True),
            })
        else:  # linear attention (KDA): fixed conv + recurrent state, fp32
            layers.append({
                "conv": TensorSpec((CONV_DIM, 4), "float32"),
                "recurrent": TensorSpec((NUM_HEADS, HEAD_DIM, HEAD_DIM), "float32"),
            })
    return KVLayout(layers)


def layer_kv(layout: KVLayout, request_id: str, layer: int, num_tokens: int) -> dict[str, np.ndarray]:
    """The KV of one layer of one request (raw random bits, seeded by request and layer)."""
    from kvwire.dtypes import numpy_dtype

    rng = np.random.default_rng([zlib.crc32(request_id.encode()), layer])
    out = {}
    for name, spec in layout.layers[layer].items():
        shape = spec.full_shape(num_tokens)
        raw = rng.integers(0, 256, size=int(np.prod(shape)) * spec.itemsize, dtype=np.uint8)
        out[name] = raw.view(numpy_dtype(spec.dtype)).reshape(shape)
    return out
