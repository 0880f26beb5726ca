"""The KV cache manager: prefix hits, allocation, sharing, freeing."""

from __future__ import annotations

import pytest

from pagedserve.core.kv_cache_manager import KVCacheManager
from pagedserve.core.kv_cache_utils import BlockHasher

from .fakes import make_request as make_unhashed_request

BLOCK_SIZE = 4


def make_request(request_id: str, prompt_token_ids: list[int], **kwargs: object):
    """A request that hashes its blocks, as the scheduler sets it up when caching is on."""
    request = make_unhashed_request(request_id, prompt_token_ids, **kwargs)  # type: ignore[arg-type]
    request.set_block_hasher(BlockHasher(BLOCK_SIZE))
    return request


def make_manager(num_blocks: int = 16, enable_caching: bool = True) -> KVCacheManager:
    return KVCacheManager(
        num_blocks=num_blocks,
        block_size=BLOCK_SIZE,
        enable_caching=enable_caching,
        max_model_len=64,
    )


def admit(manager: KVCacheManager, request, num_new_tokens: int | None = None) -> list[int]:
    """Admit like the scheduler: prefix lookup, allocate, set num_computed_tokens."""
    blocks, num_hit = manager.get_computed_blocks(request)
    if num_new_tokens is None:
        num_new_tokens = request.num_tokens - num_hit
    block_ids = manager.allocate_slots(request, num_new_tokens, blocks, num_hit)
    assert block_ids is not None
    manager.record_prefix_cache_query(request, num_hit)
    request.num_computed_tokens = num_hit
    return block_ids


def finish_step(manager: KVCacheManager, request, num_new_tokens: int) -> None:
    """The step ran: its tokens are computed."""
    manager.mark_blocks_computed()
    request.num_computed_tokens += num_new_tokens


def test_allocate_and_free() -> None:
    manager = make_manager(num_blocks=8)
    request = make_request("a", list(range(10)))
    assert admit(manager, request) == [1, 2, 3]
    assert manager.num_free_blocks == 4
    assert manager.get_block_ids("a") == [1, 2, 3]
    assert manager.usage == pytest.approx(3 / 7)
    finish_step(manager, request, 10)
    request.append_output_token_ids(50)
    # Token 10 fits in block 3; tokens 11 and 12 need a fourth block.
    assert manager.allocate_slots(request, 1) == [1, 2, 3]
    finish_step(manager, request, 1)
    request.append_output_token_ids([51, 52])
    assert manager.allocate_slots(request, 2) == [1, 2, 3, 4]
    manager.free(request)
    assert manager.num_free_blocks == 7 and manager.get_block_ids("a") == []
    manager.free(request)  # freeing twice is a no-op


def test_allocation_is_all_or_nothing() -> None:
    manager = make_manager(num_blocks=4)  # 3 usable
    big = make_request("big", list(range(16)))
    assert manager.allocate_slots(big, 16) is None
    assert manager.num_free_blocks == 3 and manager.get_block_ids("big") == []
    small = make_request("small", list(range(12)))
    assert manager.allocate_slots(small, 12) == [1, 2, 3]
    with pytest.raises(ValueError):
        manager.allocate_slots(small, 0)


def test_max_model_len_is_enforced() -> None:
    manager = make_manager()
    request = make_request("a", list(range(65)))
    with pytest.raises(ValueError, match="max_model_len"):
        manager.allocate_slots(request, 65)


def test_prefix_hit_after_finish() -> None:
    manager = make_manager()
    first = make_request("a", list(range(13)))
    admit(manager, first)
    finish_step(manager, first, 13)
    manager.free(first)
    second = make_request("b", list(range(13)) + [99, 98])
    blocks, num_hit = manager.get_computed_blocks(second)
    assert num_hit == 12 and [b.block_id for b in blocks] == [1, 2, 3]
    block_ids = manager.allocate_slots(second, 3, blocks, num_hit)
    assert block_ids == [1, 2, 3, 4]  # block 4 held token 12 of "a": uncached, reused first
    assert [b.ref_cnt for b in blocks] == [1, 1, 1]


@pytest.mark.parametrize(
    ("num_tokens", "expected_hit"),
    [(12, 8), (13, 12), (11, 8), (4, 0), (5, 4), (1, 0)],
)
def test_prefix_hit_leaves_the_last_token(num_tokens: int, expected_hit: int) -> None:
    manager = make_manager()
    owner = make_request("owner", list(range(16)))
    admit(manager, owner)
    finish_step(manager, owner, 16)
    probe = make_request("probe", list(range(num_tokens)))
    _, num_hit = manager.get_computed_blocks(probe)
    assert num_hit == expected_hit


def test_hash_collision_with_different_tokens_is_a_miss() -> None:
    manager = make_manager()
    owner = make_request("owner", list(range(12)))
    admit(manager, owner)
    finish_step(manager, owner, 12)
    # A request whose block hashes collide with the owner's but whose tokens differ.
    impostor = make_unhashed_request("impostor", [7] * 12)
    impostor.block_hashes.extend(owner.block_hashes)
    blocks, num_hit = manager.get_computed_blocks(impostor)
    assert blocks == [] and num_hit == 0
    # Same tokens in the first block only: hits stop at the first mismatch.
    partial = make_unhashed_request("partial", list(range(4)) + [7] * 8)
    partial.block_hashes.extend(owner.block_hashes)
    blocks, num_hit = manager.get_computed_blocks(partial)
    assert num_hit == 4


def test_no_hits_without_caching_or_with_prompt_logprobs() -> None:
    manager = make_manager(enable_caching=False)
    owner = make_request("owner", list(range(12)))
    admit(manager, owner)
    finish_step(manager, owner, 12)
    assert manager.get_computed_blocks(make_request("x", list(range(12)))) == ([], 0)
    assert manager.prefix_cache_stats.requests == 0

    manager = make_manager()
    owner = make_request("owner", list(range(12)))
    admit(manager, owner)
    finish_step(manager, owner, 12)
    with_logprobs = make_request("y", list(range(12)), prompt_logprobs=1)
    assert manager.get_computed_blocks(with_logprobs) == ([], 0)


def test_cache_salt_isolates_requests() -> None:
    manager = make_manager()
    owner = make_request("owner", list(range(12)), cache_salt="alice")
    admit(manager, owner)
    finish_step(manager, owner, 12)
    assert manager.get_computed_blocks(make_request("x", list(range(12))))[1] == 0
    other = make_request("y", list(range(12)), cache_salt="bob")
    assert manager.get_computed_blocks(other)[1] == 0
    same = make_request("z", list(range(12)), cache_salt="alice")
    assert manager.get_computed_blocks(same)[1] == 8


def test_siblings_share_prompt_blocks_in_the_same_step() -> None:
    """n>1: full prompt blocks are hashed at allocation, before being computed."""
    manager = make_manager()
    prompt = list(range(10))
    first, second = make_request("a", prompt), make_request("b", prompt)
    first_ids = admit(manager, first)
    second_ids = admit(manager, second)
    assert first_ids == [1, 2, 3]
    assert second_ids == [1, 2, 4]  # shares the two full blocks
    assert second.num_computed_tokens == 8
    blocks = manager.get_blocks("a")
    assert [b.ref_cnt for b in blocks] == [2, 2, 1]
    manager.free(first)
    assert [b.ref_cnt for b in blocks] == [1, 1, 0]
    manager.free(second)
    assert manager.num_free_blocks == 15


def test_free_is_tail_first() -> None:
    manager = make_manager(num_blocks=6)
    request = make_request("a", list(range(16)))
    admit(manager, request)
    finish_step(manager, request, 16)
    manager.free(request)
    free_order = [b.block_id for b in manager.block_pool.free_block_queue.get_all_free_blocks()]
    assert free_order == [5, 4, 3, 2, 1]
    # Under pressure the tail of the prompt goes first, the head survives.
    other = make_request("other", [99] * 4)
    admit(manager, other)
    probe = make_request("probe", list(range(16)) + [0])
    assert manager.get_computed_blocks(probe)[1] == 16
    third = make_request("third", [98] * 4)
    admit(manager, third)
    assert manager.get_computed_blocks(probe)[1] == 12


def test_freeing_uncomputed_blocks_uncaches_them() -> None:
    """A request freed before its step ran (preempted right after being scheduled)
    must not leave hashes for K/V that was never written."""
    manager = make_manager()
    request = make_request("a", list(range(12)))
    admit(manager, request, num_new_tokens=8)  # chunk: blocks 0 and 1 full after the step
    finish_step(manager, request, 8)
    manager.allocate_slots(request, 4)  # block 2 registered, not yet computed
    assert len(manager.block_pool.cached_block_hash_to_block) == 3
    manager.free(request)
    probe = make_request("probe", list(range(12)) + [5])
    assert manager.get_computed_blocks(probe)[1] == 8


def test_failed_step_uncaches_blocks_shared_in_that_step() -> None:
    """Siblings admitted in one step share blocks registered in that step; if the
    step never runs and both are freed, none of those blocks stays cached."""
    manager = make_manager()
    first, second = make_request("a", list(range(10))), make_request("b", list(range(10)))
    admit(manager, first)
    admit(manager, second)  # hits the two blocks "a" registered
    manager.free(first)
    manager.free(second)
    assert manager.block_pool.cached_block_hash_to_block == {}
    assert manager.num_free_blocks == 15


def test_prefix_cache_stats() -> None:
    manager = make_manager()
    first = make_request("a", list(range(10)))
    admit(manager, first)
    finish_step(manager, first, 10)
    second = make_request("b", list(range(10)))
    admit(manager, second)
    stats = manager.prefix_cache_stats
    assert (stats.requests, stats.queries, stats.hits) == (2, 20, 8)
    assert stats.hit_rate == pytest.approx(0.4)
    interval = manager.make_prefix_cache_stats()
    assert (interval.requests, interval.queries, interval.hits) == (2, 20, 8)
    assert manager.make_prefix_cache_stats().queries == 0
    assert manager.prefix_cache_stats.queries == 20  # totals keep counting


def test_hashes_follow_generated_tokens() -> None:
    """Output tokens fill blocks too; those blocks become hit-able."""
    manager = make_manager()
    request = make_request("a", list(range(6)))
    admit(manager, request)
    finish_step(manager, request, 6)
    for token in (6, 7, 8):
        request.append_output_token_ids(token)  # hashes the block it fills
        manager.allocate_slots(request, 1)
        finish_step(manager, request, 1)
    assert request.num_computed_tokens == 9
    probe = make_request("probe", list(range(9)) + [0])
    assert manager.get_computed_blocks(probe)[1] == 8
