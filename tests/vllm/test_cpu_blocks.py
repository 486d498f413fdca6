"""vLLM's CPU attention blocks read and written by position, checked against the kernel's
own write op: tokens leave one block size and land in another exactly (vLLM picks the
block size from the tensor-parallel size, so a prefill and a decode instance differ)."""

import pytest
import torch

from kvwire.integrations.vllm.cache import AttentionLayer

HEADS, HEAD = 2, 32  # head sizes the CPU kernel supports start at 32
TOKENS = 300  # over two blocks of 128 and one of 256, with a partial last block


class FullAttentionSpec:  # the fields of vLLM's spec that AttentionLayer reads
    def __init__(self, block_size):
        self.block_size, self.num_kv_heads, self.head_size = block_size, HEADS, HEAD


def kernel_written(keys, values, block_ids, block_size, num_blocks, dtype):
    """A CPU cache as vLLM's attention layer writes it: tokens p at block_ids[p // B], row p % B."""
    from vllm import _custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    cache = torch.zeros(num_blocks, HEADS, block_size, 2 * HEAD, dtype=dtype)
    k_cache, v_cache = cache.view(num_blocks, HEADS, 2 * block_size, HEAD).chunk(2, dim=2)
    positions = torch.arange(len(keys))
    slots = torch.as_tensor(block_ids)[positions // block_size] * block_size + positions % block_size
    ops.cpu_attn_reshape_and_cache(keys, values, k_cache, v_cache, slots, _get_attn_isa(dtype, block_size, HEAD),
                                   k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto")
    return cache


@pytest.fixture(params=[torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def kv(request):
    generator = torch.Generator().manual_seed(5)
    keys, values = (torch.randn(TOKENS, HEADS, HEAD, generator=generator).to(request.param) for _ in range(2))
    return keys, values, torch.stack([keys, values], dim=2)  # kvwire's per-token (heads, 2, head)


def layer(block_size, num_blocks, cache):
    return AttentionLayer("model.layers.3.self_attn.attn", cache, FullAttentionSpec(block_size), num_blocks)


@pytest.mark.parametrize("source_block, target_block", [(256, 128), (128, 256), (128, 128)])
def test_tokens_travel_between_block_sizes(kv, source_block, target_block):
    keys, values, per_token = kv
    source_ids, target_ids = [5, 1, 3], [2, 0, 6]
    source = layer(source_block, 8, kernel_written(keys, values, source_ids, source_block, 8, keys.dtype))
    gathered = source.gather(source_ids, TOKENS)["kv"]
    assert gathered.shape == (TOKENS, HEADS, 2, HEAD)
    assert torch.equal(gathered, per_token)

    target = layer(target_block, 8, torch.zeros(8, HEADS, target_block, 2 * HEAD, dtype=keys.dtype))
    target.scatter(target_ids, 0, TOKENS, {"kv": gathered})
    assert torch.equal(target.cache, kernel_written(keys, values, target_ids, target_block, 8, keys.dtype))


def test_a_load_after_a_local_prefix_keeps_the_prefix_rows(kv):
    """Tokens before ``start`` (the decode side's own prefix-cache hit) are not overwritten;
    rows past the prompt in its last block are zeroed, whatever they held (vLLM's hybrid
    pool may have kept a GDN state there: NaN as bf16, which the CPU kernel's masked tile
    arithmetic spreads into the output; seen as all-zero tokens)."""
    keys, values, per_token = kv
    ids = [4, 2, 7]
    expected = kernel_written(keys, values, ids, 128, 8, keys.dtype)
    target = layer(128, 8, kernel_written(keys[:128], values[:128], ids, 128, 8, keys.dtype))
    target.cache[7] = float("nan")  # the last block (tokens 256..299): its other rows must not stay NaN
    received = per_token.clone()
    received[:128] = 0  # whatever the push holds there, the local prefix stays
    target.scatter(ids, 128, TOKENS, {"kv": received})
    assert torch.equal(target.cache, expected)


def test_too_few_blocks_is_an_error_naming_the_layer(kv):
    keys, values, _ = kv
    source = layer(128, 8, kernel_written(keys, values, [0, 1, 2], 128, 8, keys.dtype))
    with pytest.raises(ValueError, match="model.layers.3.self_attn.attn.*300 tokens in blocks of 128 need 3"):
        source.gather([0, 1], TOKENS)
