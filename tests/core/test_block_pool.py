"""The block pool: allocation, reference counts, the null block, lazy eviction."""

from __future__ import annotations

import pytest

from pagedserve.core.block_pool import BlockPool
from pagedserve.core.kv_cache_utils import BlockHasher, KVCacheBlock

from .fakes import make_request

BLOCK_SIZE = 4


def ids(blocks: list[KVCacheBlock]) -> list[int]:
    return [block.block_id for block in blocks]


def free_ids(pool: BlockPool) -> list[int]:
    return ids(pool.free_block_queue.get_all_free_blocks())


def cached_request(num_tokens: int, request_id: str = "r"):
    request = make_request(request_id, list(range(100, 100 + num_tokens)))
    request.set_block_hasher(BlockHasher(BLOCK_SIZE))
    return request


def test_null_block_is_reserved() -> None:
    pool = BlockPool(num_blocks=5, enable_caching=True)
    assert pool.null_block.block_id == 0 and pool.null_block.is_null
    assert pool.get_num_free_blocks() == 4 and pool.num_usable_blocks == 4
    assert free_ids(pool) == [1, 2, 3, 4]
    blocks = pool.get_new_blocks(4)
    assert ids(blocks) == [1, 2, 3, 4]
    assert pool.get_num_free_blocks() == 0 and pool.get_usage() == 1.0
    with pytest.raises(ValueError):
        pool.get_new_blocks(1)
    with pytest.raises(AssertionError):
        pool.free_blocks([pool.null_block])
    with pytest.raises(ValueError):
        BlockPool(num_blocks=1, enable_caching=True)


def test_alloc_free_and_ref_counts() -> None:
    pool = BlockPool(num_blocks=6, enable_caching=False)
    blocks = pool.get_new_blocks(3)
    assert all(block.ref_cnt == 1 for block in blocks)
    assert pool.get_num_free_blocks() == 2 and pool.get_usage() == pytest.approx(3 / 5)
    pool.touch(blocks[:2])
    assert [block.ref_cnt for block in blocks] == [2, 2, 1]
    pool.free_blocks(blocks)
    assert [block.ref_cnt for block in blocks] == [1, 1, 0]
    assert pool.get_num_free_blocks() == 3
    pool.free_blocks(blocks[:2])
    assert pool.get_num_free_blocks() == 5 and pool.get_usage() == 0.0
    with pytest.raises(AssertionError):
        pool.free_blocks(blocks[:1])


def test_uncached_blocks_are_reused_first() -> None:
    pool = BlockPool(num_blocks=5, enable_caching=False)
    blocks = pool.get_new_blocks(2)  # 1, 2
    pool.free_blocks(reversed(blocks))
    # Blocks without a hash go to the head: nobody can hit them.
    assert free_ids(pool) == [1, 2, 3, 4]


def test_cache_full_blocks_and_lookup() -> None:
    pool = BlockPool(num_blocks=8, enable_caching=True)
    request = cached_request(10)  # two full blocks, one partial
    blocks = pool.get_new_blocks(3)
    pool.cache_full_blocks(request, blocks, 0, 2, BLOCK_SIZE)
    assert blocks[0].block_hash == request.block_hashes[0]
    assert blocks[0].token_ids == (100, 101, 102, 103)
    assert blocks[2].block_hash is None
    assert pool.get_cached_block(request.block_hashes[0]) is blocks[0]
    assert pool.get_cached_block(request.block_hashes[1], [104, 105, 106, 107]) is blocks[1]
    # A hash hit with different token ids is a miss.
    assert pool.get_cached_block(request.block_hashes[1], [104, 105, 106, 0]) is None
    # Caching the same range again changes nothing.
    pool.cache_full_blocks(request, blocks, 0, 2, BLOCK_SIZE)
    assert len(pool.cached_block_hash_to_block) == 2


def test_lazy_eviction_and_lru_order() -> None:
    pool = BlockPool(num_blocks=6, enable_caching=True)
    request = cached_request(12)
    blocks = pool.get_new_blocks(3)  # 1, 2, 3
    pool.cache_full_blocks(request, blocks, 0, 3, BLOCK_SIZE)
    # Freed tail first: the last block is evicted first, the head survives longest.
    pool.free_blocks(reversed(blocks))
    assert free_ids(pool) == [4, 5, 3, 2, 1]
    assert all(block.ref_cnt == 0 for block in blocks)
    # Freed but still hit-able: the hash stays until the block is reallocated.
    for block, block_hash in zip(blocks, request.block_hashes, strict=True):
        assert pool.get_cached_block(block_hash) is block

    # A hit on a free cached block takes it out of the queue in O(1).
    pool.touch([blocks[1]])
    assert blocks[1].ref_cnt == 1 and free_ids(pool) == [4, 5, 3, 1]

    # Reallocation evicts lazily: blocks 4, 5 had no hash; block 3 loses its hash now.
    new_blocks = pool.get_new_blocks(3)
    assert ids(new_blocks) == [4, 5, 3]
    assert blocks[2].block_hash is None
    assert pool.get_cached_block(request.block_hashes[2]) is None
    assert pool.get_cached_block(request.block_hashes[0]) is blocks[0]
    assert pool.get_cached_block(request.block_hashes[1]) is blocks[1]
    assert free_ids(pool) == [1]


def test_duplicate_hashes_are_tracked_per_block() -> None:
    pool = BlockPool(num_blocks=6, enable_caching=True)
    first, second = cached_request(4, "a"), cached_request(4, "b")
    block_a, block_b = pool.get_new_blocks(2)
    pool.cache_full_blocks(first, [block_a], 0, 1, BLOCK_SIZE)
    pool.cache_full_blocks(second, [block_b], 0, 1, BLOCK_SIZE)
    block_hash = first.block_hashes[0]
    assert set(pool.cached_block_hash_to_block[block_hash]) == {block_a.block_id, block_b.block_id}
    pool.free_blocks([block_a, block_b])
    pool.get_new_blocks(3)  # 3, 4, 5: uncached ones first
    assert pool.get_cached_block(block_hash) in (block_a, block_b)
    evicted = pool.get_new_blocks(1)[0]
    assert evicted is block_a
    assert pool.get_cached_block(block_hash) is block_b
    pool.get_new_blocks(1)
    assert block_hash not in pool.cached_block_hash_to_block


def test_uncache_block() -> None:
    pool = BlockPool(num_blocks=4, enable_caching=True)
    request = cached_request(4)
    (block,) = pool.get_new_blocks(1)
    pool.cache_full_blocks(request, [block], 0, 1, BLOCK_SIZE)
    pool.uncache_block(block)
    assert block.block_hash is None and pool.cached_block_hash_to_block == {}
    pool.uncache_block(block)  # no-op


def test_reset_prefix_cache() -> None:
    pool = BlockPool(num_blocks=4, enable_caching=True)
    request = cached_request(8)
    blocks = pool.get_new_blocks(2)
    pool.cache_full_blocks(request, blocks, 0, 2, BLOCK_SIZE)
    assert not pool.reset_prefix_cache()  # blocks in use
    assert pool.get_cached_block(request.block_hashes[0]) is blocks[0]
    pool.free_blocks(blocks)
    assert pool.reset_prefix_cache()
    assert pool.get_cached_block(request.block_hashes[0]) is None
    assert all(block.block_hash is None for block in pool.blocks)
    assert pool.get_num_free_blocks() == 3
