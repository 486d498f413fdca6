"""Shard pieces between a prefill and a decode instance of different TP sizes, checked
against shards cut here the way vLLM cuts them (attention KV by KV head, replicated where
TP exceeds the heads; GatedDeltaNet conv channels as q | k | v, each split on its own;
recurrent state by value head): every decode rank gets exactly its own shard."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from kvwire.integrations.vllm import topology

CONFIG = SimpleNamespace(num_key_value_heads=2, linear_num_key_heads=4, linear_num_value_heads=8,
                         linear_key_head_dim=4, linear_value_head_dim=6)
KINDS = ["state", "attention", "mla"]
TOKENS = 7


def whole_tensors(seed=0):
    """The unsharded KV of one request: a GDN layer, an attention layer, an MLA layer."""
    rng = np.random.default_rng(seed)
    c = CONFIG
    channels = 2 * c.linear_num_key_heads * c.linear_key_head_dim + c.linear_num_value_heads * c.linear_value_head_dim
    return [
        {"conv": rng.standard_normal((3, channels), dtype=np.float32),
         "recurrent": rng.standard_normal((c.linear_num_value_heads, 6, 4), dtype=np.float32)},
        {"kv": rng.standard_normal((TOKENS, c.num_key_value_heads, 2, 8), dtype=np.float32)},
        {"latent": rng.standard_normal((TOKENS, 1, 10), dtype=np.float32)},
    ]


def heads_of(num_heads, tp, rank):
    if tp <= num_heads:
        per = num_heads // tp
        return slice(rank * per, (rank + 1) * per)
    first = rank // (tp // num_heads)
    return slice(first, first + 1)


def vllm_shard(whole, tp, rank):
    c = CONFIG
    q = c.linear_num_key_heads * c.linear_key_head_dim
    conv = whole[0]["conv"]
    parts = np.split(conv, [q, 2 * q], axis=1)
    sizes = (c.linear_key_head_dim, c.linear_key_head_dim, c.linear_value_head_dim)
    heads = (c.linear_num_key_heads, c.linear_num_key_heads, c.linear_num_value_heads)
    conv_shard = np.concatenate([p.reshape(3, h, s)[:, heads_of(h, tp, rank)].reshape(3, -1)
                                 for p, h, s in zip(parts, heads, sizes)], axis=1)
    return [
        {"conv": conv_shard, "recurrent": whole[0]["recurrent"][heads_of(c.linear_num_value_heads, tp, rank)]},
        {"kv": whole[1]["kv"][:, heads_of(c.num_key_value_heads, tp, rank)]},
        {"latent": whole[2]["latent"]},
    ]


def geometry_at(tp):
    local = [{n: a for n, a in layer.items()} for layer in vllm_shard(whole_tensors(), tp, 0)]
    from kvwire import KVLayout, TensorSpec

    layout = KVLayout([{n: TensorSpec(a.shape[1:] if n in ("kv", "latent") else a.shape, "float32",
                                      per_token=n in ("kv", "latent")) for n, a in layer.items()} for layer in local])
    return topology.geometry_of(layout, KINDS, CONFIG, tp)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_the_geometry_is_the_same_at_every_tp(tp):
    geometry = geometry_at(tp)
    assert geometry == geometry_at(1)
    assert not geometry.unsharded()


@pytest.mark.parametrize("prefill_tp, decode_tp", [(2, 1), (1, 2), (4, 2), (2, 4), (4, 1), (1, 4), (4, 8), (8, 2)])
def test_every_decode_rank_gets_exactly_its_shard(prefill_tp, decode_tp):
    geometry, whole = geometry_at(1), whole_tensors(seed=prefill_tp * 10 + decode_tp)
    sent = {}
    for source in range(prefill_tp):
        shard = vllm_shard(whole, prefill_tp, source)
        for target in topology.targets_of(geometry, prefill_tp, source, decode_tp):
            layout = topology.piece_layout(geometry, prefill_tp, source, decode_tp, target)
            assert layout in topology.accepted_layouts(geometry, decode_tp, target)
            layers = []
            for index, layer in enumerate(shard):
                torch_layer = {n: torch.from_numpy(a) for n, a in layer.items()}
                picked = topology.select(torch_layer, geometry.layers[index], prefill_tp, source, decode_tp, target)
                assert {n: tuple(t.shape) for n, t in picked.items()} == {
                    n: spec.full_shape(TOKENS) for n, spec in layout.layers[index].items()}
                layers.append({n: t.numpy() for n, t in picked.items()})
            sent[source, target] = layers
    for target in range(decode_tp):
        sources = topology.sources_of(geometry, prefill_tp, decode_tp, target)
        assert sources == sorted(s for s, t in sent if t == target)
        own = vllm_shard(whole, decode_tp, target)
        for index in range(3):
            got = topology.assemble({s: sent[s, target][index] for s in sources}, geometry.layers[index],
                                    prefill_tp, decode_tp, target, TOKENS)
            for name, array in own[index].items():
                assert got[name].tobytes() == np.ascontiguousarray(array).tobytes(), (target, index, name)
    # each element of a prefill rank's shard leaves it at most once per decode rank that holds it
    carried = sum(a.nbytes for layers in sent.values() for layer in layers for a in layer.values())
    needed = sum(a.nbytes for t in range(decode_tp) for layer in vllm_shard(whole, decode_tp, t) for a in layer.values())
    assert carried == needed


def test_heads_that_do_not_divide_are_refused_naming_the_tensor():
    with pytest.raises(ValueError, match="layer 0 conv.*cannot be split across TP 3"):
        geometry_at(1).check_tp(3)


def test_another_model_is_told_apart_from_another_tp():
    other = SimpleNamespace(**{**vars(CONFIG), "num_key_value_heads": 4})
    local = geometry_at(1).local_layout(1)
    theirs = topology.geometry_of(local, KINDS, other, 1)
    assert "layer 1" in geometry_at(2).difference(theirs)


def test_decode_ranks_are_reached_through_the_address_the_prefill_side_was_given():
    from kvwire.integrations.vllm.worker import reachable

    published = ["0.0.0.0:7000", "0.0.0.0:7001", "10.0.0.9:7000"]
    # a relay (or NAT) at 127.0.0.1:9100 fronts rank 0: rank 1 at the same offset; a rank on another host as published
    assert reachable(published, "127.0.0.1:9100") == ["127.0.0.1:9100", "127.0.0.1:9101", "10.0.0.9:7000"]
