"""Chained prefix-block hashes and the LRU, byte-bounded, per-boundary prefix cache."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from serving.policy import WorkerView, place
from serving.prefix_cache import PrefixCache, block_hashes, prompt_blocks


def test_hashes_are_chained_over_the_whole_prefix():
    a = block_hashes(list(range(12)), 4)
    b = block_hashes([0, 1, 2, 3, 99, 5, 6, 7, 8, 9, 10, 11], 4)
    assert len(a) == 3 and a[0] == b[0]
    assert a[1] != b[1] and a[2] != b[2]  # block 2 is identical, but its prefix is not
    assert block_hashes(list(range(14)), 4) == a  # a partial last block has no boundary
    assert block_hashes(list(range(4)), 4, salt=b"other-model") != a[:1]
    assert block_hashes([], 4) == []
    with pytest.raises(ValueError, match="block_tokens"):
        block_hashes([1, 2], 0)


def test_the_last_token_is_always_prefilled():
    # A prompt of exactly two blocks may reuse only the first: the last token yields the logits.
    assert prompt_blocks(list(range(8)), 4).hashes == tuple(block_hashes(list(range(8)), 4)[:1])
    assert prompt_blocks(list(range(9)), 4).hashes == tuple(block_hashes(list(range(8)), 4))
    assert prompt_blocks([], 4).hashes == ()


def test_lookup_returns_the_longest_cached_boundary():
    cache = PrefixCache(capacity_bytes=1000, block_tokens=4)
    tokens = list(range(20))
    cache.put(tokens[:4], "state@4", 10)
    cache.put(tokens[:12], "state@12", 10)
    hit = cache.lookup(tokens)
    assert (hit.num_tokens, hit.value) == (12, "state@12")
    assert cache.lookup(tokens[:12]).num_tokens == 4  # boundary 12 would leave no token to prefill
    assert cache.lookup([7] + tokens[1:]) is None  # a different first block changes every hash
    # Boundary 8 was never stored (no linear state there): a prompt diverging at 9 reuses 4.
    assert cache.lookup(tokens[:9] + [99] * 8).num_tokens == 4


def test_lru_eviction_by_bytes():
    evicted = []
    cache = PrefixCache(capacity_bytes=100, block_tokens=2, on_evict=evicted.append)
    a, b, c = [1, 1], [2, 2], [3, 3]
    cache.put(a, "a", 40)
    cache.put(b, "b", 40)
    assert cache.lookup(a + [0]).value == "a"  # touch a: b is now least recently used
    cache.put(c, "c", 40)
    assert evicted == ["b"] and cache.used_bytes == 80 and len(cache) == 2
    assert cache.lookup(b + [0]) is None
    assert cache.block_hashes() == [block_hashes(a, 2)[0], block_hashes(c, 2)[0]]
    cache.put(a, "a2", 70)  # replacing frees the old entry, then c must go too
    assert evicted == ["b", "a", "c"] and cache.used_bytes == 70
    cache.clear()
    assert evicted[-1] == "a2" and cache.used_bytes == 0 and len(cache) == 0


def test_put_checks_its_arguments():
    cache = PrefixCache(capacity_bytes=100, block_tokens=4)
    assert cache.can_put(100) and not cache.can_put(101)
    with pytest.raises(ValueError, match="cannot fit"):
        cache.put([1, 2, 3, 4], "big", 101)
    with pytest.raises(ValueError, match="multiple of 4"):
        cache.put([1, 2, 3], "partial", 1)
    with pytest.raises(ValueError, match="multiple of 4"):
        cache.put([], "empty", 1)
    with pytest.raises(ValueError):
        PrefixCache(capacity_bytes=100, block_tokens=0)


def test_reported_hashes_route_to_the_worker_that_can_reuse_them():
    block = 4
    shared = list(range(16))
    warm, cold = PrefixCache(10_000, block), PrefixCache(10_000, block)
    warm.put(shared[:8], "kv+state@8", 100)
    warm.put(shared[:16], "kv+state@16", 100)
    cold.put(shared[:4], "kv+state@4", 100)
    prompt = shared + [500, 501, 502]
    workers = [WorkerView("cold", frozenset(cold.block_hashes())), WorkerView("warm", frozenset(warm.block_hashes()))]
    chosen = place(prompt_blocks(prompt, block), workers)
    assert (chosen.worker, chosen.cached_tokens, chosen.incremental_tokens) == ("warm", 16, 3)
    assert warm.lookup(prompt).num_tokens == chosen.cached_tokens


@settings(max_examples=60, deadline=None)
@given(tokens=st.lists(st.integers(0, 3), max_size=24), stored=st.lists(st.integers(1, 6), max_size=6),
       other=st.lists(st.integers(0, 3), min_size=4, max_size=24))
def test_lookup_matches_a_naive_prefix_scan(tokens, stored, other):
    block = 4
    cache = PrefixCache(capacity_bytes=10**9, block_tokens=block)
    source = other + [0] * 24
    for num_blocks in stored:
        cache.put(source[: num_blocks * block], num_blocks, 1)
    expected = max((n * block for n in stored
                    if n * block < len(tokens) and tokens[: n * block] == source[: n * block]), default=0)
    hit = cache.lookup(tokens)
    assert (hit.num_tokens if hit else 0) == expected
