"""Prefix hashing and the intrusive free-block queue."""

from __future__ import annotations

import pytest

from pagedserve.core.kv_cache_utils import (
    NONE_HASH,
    BlockHasher,
    FreeKVCacheBlockQueue,
    KVCacheBlock,
    hash_block_tokens,
)

from .fakes import make_request


def ids(blocks: list[KVCacheBlock]) -> list[int]:
    return [block.block_id for block in blocks]


# -- hashing ------------------------------------------------------------------------


def test_hash_is_deterministic_and_chained() -> None:
    first = hash_block_tokens(None, [1, 2, 3, 4])
    assert first == hash_block_tokens(NONE_HASH, (1, 2, 3, 4))
    assert isinstance(first, bytes) and len(first) == 32
    second = hash_block_tokens(first, [5, 6, 7, 8])
    # The same tokens under another parent hash differently.
    assert second != hash_block_tokens(None, [5, 6, 7, 8])
    assert second != hash_block_tokens(hash_block_tokens(None, [1, 2, 3, 5]), [5, 6, 7, 8])
    # Order and content matter.
    assert first != hash_block_tokens(None, [4, 3, 2, 1])
    assert first != hash_block_tokens(None, [1, 2, 3])


def test_hash_extra_keys() -> None:
    plain = hash_block_tokens(None, [1, 2, 3, 4])
    salted = hash_block_tokens(None, [1, 2, 3, 4], ("salt",))
    assert salted != plain
    assert salted == hash_block_tokens(None, [1, 2, 3, 4], ("salt",))
    assert salted != hash_block_tokens(None, [1, 2, 3, 4], ("other",))
    # Empty extra keys are no extra keys.
    assert hash_block_tokens(None, [1, 2, 3, 4], ()) == plain


def test_block_hasher_is_incremental() -> None:
    hasher = BlockHasher(block_size=4)
    new = hasher(list(range(10)), [])
    assert len(new) == 2
    assert new[0] == hash_block_tokens(None, [0, 1, 2, 3])
    assert new[1] == hash_block_tokens(new[0], [4, 5, 6, 7])
    # Nothing new until a block fills up; hashed blocks are not hashed again.
    assert hasher(list(range(11)), new) == []
    more = hasher(list(range(12)), new)
    assert more == [hash_block_tokens(new[1], [8, 9, 10, 11])]


def test_request_hashes_its_blocks_as_tokens_arrive() -> None:
    request = make_request("r", list(range(10)))
    assert request.block_hashes == []  # no hasher: no prefix caching
    request.set_block_hasher(BlockHasher(4))
    assert request.block_hashes == BlockHasher(4)(list(range(10)), [])
    request.append_output_token_ids(10)
    assert len(request.block_hashes) == 2
    # Existing hashes are kept as they are, never recomputed.
    sentinel = request.block_hashes[1]
    request.append_output_token_ids([11, 12])
    assert len(request.block_hashes) == 3 and request.block_hashes[1] is sentinel
    assert request.block_hashes[2] == hash_block_tokens(sentinel, [8, 9, 10, 11])


def test_cache_salt_changes_the_whole_chain() -> None:
    plain = make_request("a", list(range(8)))
    salted = make_request("b", list(range(8)), cache_salt="tenant-1")
    same_salt = make_request("c", list(range(8)), cache_salt="tenant-1")
    for request in (plain, salted, same_salt):
        request.set_block_hasher(BlockHasher(4))
    assert salted.block_hashes[0] == hash_block_tokens(None, [0, 1, 2, 3], ("tenant-1",))
    assert all(x != y for x, y in zip(plain.block_hashes, salted.block_hashes, strict=True))
    assert salted.block_hashes == same_salt.block_hashes
    # The salt is an extra key of the first block only.
    assert salted.block_hashes[1] == hash_block_tokens(salted.block_hashes[0], [4, 5, 6, 7])


def test_no_import_cycle_in_core() -> None:
    """kv_cache_utils hashes plain token ids: it knows nothing of Request."""
    import ast
    import pathlib

    import pagedserve.core.kv_cache_utils as kv_cache_utils

    tree = ast.parse(pathlib.Path(kv_cache_utils.__file__).read_text())
    imported = {
        node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module
    }
    assert not any(module.startswith("pagedserve.core") for module in imported)


# -- free queue ---------------------------------------------------------------------


def make_blocks(n: int) -> list[KVCacheBlock]:
    return [KVCacheBlock(block_id=i) for i in range(n)]


def test_free_queue_popleft_and_append() -> None:
    blocks = make_blocks(5)
    queue = FreeKVCacheBlockQueue(blocks)
    assert len(queue) == 5 and ids(queue.get_all_free_blocks()) == [0, 1, 2, 3, 4]
    assert queue.popleft() is blocks[0]
    assert not blocks[0].in_free_queue
    queue.append(blocks[0])
    assert ids(queue.get_all_free_blocks()) == [1, 2, 3, 4, 0]
    assert ids(queue.popleft_n(3)) == [1, 2, 3]
    assert ids(queue.get_all_free_blocks()) == [4, 0] and queue.num_free_blocks == 2
    queue.append_n([blocks[3], blocks[1]])
    assert ids(queue.get_all_free_blocks()) == [4, 0, 3, 1]
    queue.appendleft(blocks[2])
    assert ids(queue.get_all_free_blocks()) == [2, 4, 0, 3, 1]
    assert queue.num_free_blocks == 5


def test_free_queue_remove_from_anywhere() -> None:
    blocks = make_blocks(5)
    queue = FreeKVCacheBlockQueue(blocks)
    queue.remove(blocks[2])  # middle
    queue.remove(blocks[0])  # head
    queue.remove(blocks[4])  # tail
    assert ids(queue.get_all_free_blocks()) == [1, 3] and len(queue) == 2
    assert not blocks[2].in_free_queue and blocks[1].in_free_queue
    with pytest.raises(ValueError):
        queue.remove(blocks[2])
    queue.append(blocks[4])
    queue.append(blocks[2])
    assert ids(queue.get_all_free_blocks()) == [1, 3, 4, 2]
    assert queue.popleft() is blocks[1]


def test_free_queue_empty() -> None:
    queue = FreeKVCacheBlockQueue(make_blocks(2))
    assert ids(queue.popleft_n(2)) == [0, 1]
    assert len(queue) == 0 and queue.get_all_free_blocks() == []
    with pytest.raises(ValueError):
        queue.popleft()
    with pytest.raises(ValueError):
        queue.popleft_n(1)
    assert queue.popleft_n(0) == []


def test_free_queue_rejects_double_append() -> None:
    blocks = make_blocks(2)
    queue = FreeKVCacheBlockQueue(blocks)
    with pytest.raises(AssertionError):
        queue.append(blocks[0])
