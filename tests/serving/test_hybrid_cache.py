"""The KVLayout derived from the config is the cache the model really writes, and an
exported-then-rebuilt cache decodes exactly like generate()."""

import numpy as np
import pytest

from kvwire import TensorSpec
from serving.hybrid_cache import export_layer, kv_layout, new_cache, probe_layout, rebuild_layer
from serving.model import load
from serving.steps import Sampling, decode, generate_monolithic, pick_token, prefill

from .support import KIMI, QWEN

CASES = [(KIMI, "float32"), (KIMI, "bfloat16"), (QWEN, "float32"), (QWEN, "bfloat16")]


@pytest.mark.parametrize("architecture,dtype", CASES)
def test_layout_from_config_is_what_the_model_writes(checkpoints, architecture, dtype):
    loaded = load(checkpoints(architecture, dtype))
    layout = kv_layout(loaded.config, dtype)
    assert layout == probe_layout(loaded.model), layout.difference(probe_layout(loaded.model))


def test_kimi_layout_in_detail(kimi):
    layout = kv_layout(kimi.config, "bfloat16")
    # tiny Kimi: 2 KDA heads of 16 -> conv over q,k,v (96 channels) x kernel 4; MLA latent 32 + rope key 16
    assert layout.layers[0] == {"conv": TensorSpec((96, 4), "bfloat16"), "recurrent": TensorSpec((2, 16, 16), "float32")}
    assert layout.layers[3] == {"keys": TensorSpec((1, 32), "bfloat16", per_token=True),
                                "values": TensorSpec((1, 16), "bfloat16", per_token=True)}
    assert [sorted(layer) for layer in layout.layers] == [["conv", "recurrent"]] * 3 + [["keys", "values"]] + \
        [["conv", "recurrent"]] * 3 + [["keys", "values"]]


@pytest.mark.parametrize("architecture,dtype", CASES)
def test_hooks_export_a_cache_that_rebuilds_to_identical_tokens(checkpoints, architecture, dtype):
    loaded = load(checkpoints(architecture, dtype))
    prompt = np.random.default_rng(3).integers(3, 512, 77).tolist()
    expected = generate_monolithic(loaded.model, prompt, 10)

    exported = {}

    def on_layer(index, tensors):
        assert index not in exported and len(exported) == index  # in layer order, once each
        exported[index] = {name: t.clone() for name, t in tensors.items()}

    logits, _ = prefill(loaded.model, prompt, on_layer)
    first = pick_token(logits, Sampling(), None)
    cache = new_cache(loaded.config)
    for index, tensors in exported.items():
        rebuild_layer(cache, index, {name: _numpy(t) for name, t in tensors.items()})
    tokens = [first, *decode(loaded.model, cache, first, 10, Sampling(), loaded.eos_token_ids)]
    assert tokens == expected
    assert len(tokens) == 10


def test_export_is_batch_free_and_per_token_first(kimi):
    _, cache = prefill(kimi.model, list(range(3, 40)))
    assert {k: tuple(v.shape) for k, v in export_layer(cache, 0).items()} == {"conv": (96, 4), "recurrent": (2, 16, 16)}
    assert {k: tuple(v.shape) for k, v in export_layer(cache, 3).items()} == {"keys": (37, 1, 32), "values": (37, 1, 16)}


def _numpy(tensor):
    import ml_dtypes
    import torch

    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.uint16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()
