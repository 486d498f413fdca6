"""Prefill from a cached prefix: the same logits and tokens as computing it all."""

import numpy as np
import pytest
import torch

from serving.hybrid_cache import export_layer, restore, snapshot, snapshot_bytes
from serving.prefix_cache import PrefixCache
from serving.prefix_reuse import last_boundary, prefill_reusing
from serving.steps import Sampling, decode, generate_monolithic

BLOCK = 64


def ids(seed, n):
    return np.random.default_rng(seed).integers(3, 512, n).tolist()


def tokens_from(model, result, n=8):
    first = int(result.logits.argmax())
    return [first, *decode(model, result.cache, first, n, Sampling(), frozenset())]


@pytest.mark.parametrize("n, expected", [(1, 0), (64, 0), (65, 64), (128, 64), (200, 192)])
def test_last_boundary_leaves_the_last_token_to_compute(n, expected):
    assert last_boundary(n, BLOCK) == expected


def test_snapshot_restores_every_layer_bit_for_bit(kimi):
    result = prefill_reusing(kimi.model, ids(1, 100), None)
    layers = snapshot(result.cache, 100)
    again = restore(kimi.model.config, layers)
    for i in range(len(layers)):
        for name, tensor in export_layer(again, i).items():
            assert torch.equal(tensor, layers[i][name])
    assert snapshot_bytes(layers) == sum(t.numel() * 4 for layer in layers for t in layer.values())


def test_repeated_prefix_prefills_only_new_tokens_with_the_same_tokens(kimi):
    cache = PrefixCache(64 << 20, BLOCK, b"model")
    shared = ids(2, 3 * BLOCK)
    first = prefill_reusing(kimi.model, shared + ids(3, 10), cache)
    assert (first.reused_tokens, first.boundary_tokens, len(cache)) == (0, 192, 1)
    prompt = shared + ids(4, 25)
    second = prefill_reusing(kimi.model, prompt, cache)
    assert (second.reused_tokens, second.boundary_tokens) == (192, 192)
    assert tokens_from(kimi.model, second) == generate_monolithic(kimi.model, prompt, 8)
    # a cold cache computes the same two chunks: identical logits
    cold = prefill_reusing(kimi.model, prompt, PrefixCache(64 << 20, BLOCK, b"model"))
    assert torch.equal(cold.logits, second.logits)


def test_layers_are_sent_from_the_receivers_prefix(kimi):
    sent = {}
    prompt = ids(5, 150)
    prefill_reusing(kimi.model, prompt, None, on_layer=lambda i, t: sent.setdefault(i, t), send_from=128)
    attention = [i for i, t in sent.items() if "keys" in t]
    assert attention and all(sent[i]["keys"].shape[0] == 22 for i in attention)
    with pytest.raises(ValueError, match="send_from=150 must be in"):
        prefill_reusing(kimi.model, prompt, None, on_layer=lambda i, t: None, send_from=150)


def test_an_entry_too_big_for_the_cache_is_not_kept(kimi):
    cache = PrefixCache(1000, BLOCK)
    result = prefill_reusing(kimi.model, ids(6, 100), cache)
    assert len(cache) == 0 and result.boundary_tokens == 64  # the snapshot still serves this request's boundary


def test_decode_worker_recomputes_when_the_prefix_the_kv_continues_is_gone(kimi):
    from serving.decode import DecodeOptions, DecodeWorker

    from serving.protocol import DecodeJob

    def job(**prefix):
        return DecodeJob(request_id="r", prompt_token_ids=[1], max_tokens=1, **prefix)

    worker = DecodeWorker(kimi, DecodeOptions(prefix_cache_bytes=1 << 20))
    try:
        assert worker.prefix_base(job(cached_tokens=0)) == (None, None)
        base, error = worker.prefix_base(job(cached_tokens=64, cached_hash="0" * 32))
        assert base is None and error.startswith("PrefixEvicted: the 64-token prefix the KV continues")
        prompt = ids(8, 100)
        result = prefill_reusing(kimi.model, prompt, worker.prefix_cache)  # what a recompute leaves behind
        held = worker.prefix_cache.lookup(prompt)
        assert worker.prefix_base(job(cached_tokens=64, cached_hash=held.block_hash))[0].num_tokens == 64
        assert result.boundary_tokens == 64
    finally:
        worker.close()
