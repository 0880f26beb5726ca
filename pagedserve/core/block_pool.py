"""The pool of KV cache blocks: allocation, reference counts, prefix-cache map."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from pagedserve.core.kv_cache_utils import BlockHash, FreeKVCacheBlockQueue, KVCacheBlock

if TYPE_CHECKING:
    from pagedserve.core.request import Request

logger = logging.getLogger(__name__)


class BlockPool:
    """All KV cache blocks of the engine.

    Block 0 is the reserved null block: it is never handed out and never freed.
    Free blocks sit in an LRU queue (head = next to be reused). A freed block
    keeps its hash and stays hit-able until it is reallocated (lazy eviction).
    Freed blocks that were never cached go to the head of the queue, since no
    one can reuse their contents; cached ones go to the tail, in the order given.
    Several blocks may carry the same hash (two requests computed the same block
    independently); a lookup returns any of them.
    """

    def __init__(self, num_blocks: int, enable_caching: bool) -> None:
        if num_blocks < 2:
            raise ValueError(
                f"the block pool needs at least 2 blocks (block 0 is reserved), got {num_blocks}"
            )
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks: list[KVCacheBlock] = [KVCacheBlock(block_id=i) for i in range(num_blocks)]
        self.free_block_queue = FreeKVCacheBlockQueue(self.blocks)
        # hash -> {block_id: block}, for full blocks registered in the prefix cache.
        self.cached_block_hash_to_block: dict[BlockHash, dict[int, KVCacheBlock]] = {}
        self.null_block = self.free_block_queue.popleft()
        self.null_block.is_null = True
        assert self.null_block.block_id == 0

    # -- allocation ---------------------------------------------------------------

    def get_new_blocks(self, num_blocks: int) -> list[KVCacheBlock]:
        """Take ``num_blocks`` blocks from the LRU head, each with ref_cnt 1.

        A cached block taken here loses its hash now (lazy eviction).
        """
        if num_blocks > self.free_block_queue.num_free_blocks:
            raise ValueError(
                f"cannot get {num_blocks} free blocks, only "
                f"{self.free_block_queue.num_free_blocks} are free"
            )
        blocks = self.free_block_queue.popleft_n(num_blocks)
        for block in blocks:
            assert block.ref_cnt == 0 and not block.is_null
            if block.block_hash is not None:
                self._evict_cached_block(block)
            block.ref_cnt = 1
        return blocks

    def get_cached_block(
        self, block_hash: BlockHash, token_ids: Sequence[int] | None = None
    ) -> KVCacheBlock | None:
        """A block registered under ``block_hash`` (whose tokens equal ``token_ids``
        when given), or None."""
        blocks = self.cached_block_hash_to_block.get(block_hash)
        if not blocks:
            return None
        if token_ids is None:
            return next(iter(blocks.values()))
        expected = tuple(token_ids)
        for block in blocks.values():
            if block.token_ids == expected:
                return block
        logger.warning("prefix cache: hash hit with different token ids; treating as a miss")
        return None

    def touch(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Take another reference to each block (a prefix hit).

        A free cached block leaves the free queue in O(1).
        """
        for block in blocks:
            assert not block.is_null, "the null block cannot be shared"
            if block.ref_cnt == 0:
                self.free_block_queue.remove(block)
            block.ref_cnt += 1

    def cache_full_blocks(
        self,
        request: Request,
        blocks: Sequence[KVCacheBlock],
        num_cached_blocks: int,
        num_full_blocks: int,
        block_size: int,
    ) -> list[KVCacheBlock]:
        """Register blocks ``[num_cached_blocks, num_full_blocks)`` of ``request``.

        ``request.block_hashes`` must already cover ``num_full_blocks`` blocks.
        Blocks that already carry a hash (prefix hits) are left as they are.
        Returns the blocks registered by this call.
        """
        if num_cached_blocks >= num_full_blocks:
            return []
        assert len(request.block_hashes) >= num_full_blocks, (
            f"{request.request_id}: {len(request.block_hashes)} block hashes, "
            f"need {num_full_blocks}"
        )
        assert len(blocks) >= num_full_blocks
        token_ids = request.all_token_ids
        newly_cached: list[KVCacheBlock] = []
        for block_index in range(num_cached_blocks, num_full_blocks):
            block = blocks[block_index]
            block_hash = request.block_hashes[block_index]
            if block.block_hash is not None:
                assert block.block_hash == block_hash, "a block changed its contents"
                continue
            begin = block_index * block_size
            block.block_hash = block_hash
            block.token_ids = tuple(token_ids[begin : begin + block_size])
            self.cached_block_hash_to_block.setdefault(block_hash, {})[block.block_id] = block
            newly_cached.append(block)
        return newly_cached

    def free_blocks(self, ordered_blocks: Iterable[KVCacheBlock]) -> None:
        """Drop one reference to each block; blocks reaching 0 become free.

        ``ordered_blocks`` is in eviction order: the first to be reused first.
        """
        for block in ordered_blocks:
            assert not block.is_null, "the null block is never freed"
            assert block.ref_cnt > 0, f"block {block.block_id} freed more often than taken"
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                if block.block_hash is None:
                    self.free_block_queue.appendleft(block)
                else:
                    self.free_block_queue.append(block)

    def uncache_block(self, block: KVCacheBlock) -> None:
        """Remove ``block`` from the prefix cache (its contents are not valid)."""
        if block.block_hash is not None:
            self._evict_cached_block(block)

    def _evict_cached_block(self, block: KVCacheBlock) -> None:
        block_hash = block.block_hash
        assert block_hash is not None
        blocks = self.cached_block_hash_to_block.get(block_hash)
        if blocks is not None:
            blocks.pop(block.block_id, None)
            if not blocks:
                del self.cached_block_hash_to_block[block_hash]
        block.reset_hash()

    # -- accounting ---------------------------------------------------------------

    def get_num_free_blocks(self) -> int:
        return self.free_block_queue.num_free_blocks

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    def get_usage(self) -> float:
        """Fraction of usable blocks (all but the null block) in use, 0..1."""
        return 1.0 - self.get_num_free_blocks() / self.num_usable_blocks

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash. Only when no block is in use; True on success."""
        num_used_blocks = self.num_usable_blocks - self.get_num_free_blocks()
        if num_used_blocks > 0:
            logger.warning(
                "cannot reset the prefix cache: %d blocks are still in use", num_used_blocks
            )
            return False
        self.cached_block_hash_to_block.clear()
        for block in self.blocks:
            block.reset_hash()
        logger.info("prefix cache reset")
        return True
