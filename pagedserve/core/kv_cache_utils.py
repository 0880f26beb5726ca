"""Prefix hashing, KV cache blocks and the intrusive free-block queue.

Nothing here knows a ``Request``: requests hash their own blocks with a
:class:`BlockHasher`, and the pool and manager read ``request.block_hashes``.
"""

from __future__ import annotations

import hashlib
import pickle
import struct
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NewType

# A block hash is the sha256 digest (32 bytes) of the parent's hash, the block's
# token ids and its extra keys. sha256 makes accidental collisions practically
# impossible; token ids are still verified on a hit.
BlockHash = NewType("BlockHash", bytes)

# The parent hash of the first block of every sequence. Fixed, so hashes are
# stable across processes (isolation between tenants comes from cache_salt).
NONE_HASH: BlockHash = BlockHash(hashlib.sha256(b"pagedserve/prefix-cache/root").digest())


def hash_block_tokens(
    parent_block_hash: BlockHash | None,
    token_ids: Sequence[int],
    extra_keys: tuple[Any, ...] | None = None,
) -> BlockHash:
    """Hash one block: ``H((parent_hash, tuple(token_ids), extra_keys))``.

    ``parent_block_hash`` is None (or NONE_HASH) for the first block. The
    encoding is unambiguous: fixed-size parent, token count, 64-bit token ids,
    then the pickled extra keys when there are any.
    """
    if parent_block_hash is None:
        parent_block_hash = NONE_HASH
    hasher = hashlib.sha256(parent_block_hash)
    hasher.update(struct.pack("<Q", len(token_ids)))
    hasher.update(array("q", token_ids).tobytes())
    if extra_keys:
        hasher.update(pickle.dumps(extra_keys, protocol=5))
    return BlockHash(hasher.digest())


class BlockHasher:
    """Hashes the newly full blocks of a token sequence, for one block size.

    A request holds one (``Request.set_block_hasher``) and extends its
    ``block_hashes`` with it whenever tokens arrive, so hashes are computed once.
    The cache salt is an extra key of the first block: it changes every hash of the
    chain, so requests with different salts never share blocks.
    """

    __slots__ = ("block_size",)

    def __init__(self, block_size: int) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size

    def __call__(
        self,
        token_ids: Sequence[int],
        block_hashes: Sequence[BlockHash],
        cache_salt: str | None = None,
    ) -> list[BlockHash]:
        """The hashes of the full blocks of ``token_ids`` after the ``len(block_hashes)``
        already hashed (which are never recomputed)."""
        block_size = self.block_size
        num_full_blocks = len(token_ids) // block_size
        start = len(block_hashes)
        if start >= num_full_blocks:
            return []
        parent = block_hashes[-1] if block_hashes else NONE_HASH
        new_hashes: list[BlockHash] = []
        for block_index in range(start, num_full_blocks):
            begin = block_index * block_size
            extra_keys = (cache_salt,) if block_index == 0 and cache_salt else None
            parent = hash_block_tokens(parent, token_ids[begin : begin + block_size], extra_keys)
            new_hashes.append(parent)
        return new_hashes


@dataclass(eq=False, slots=True)
class KVCacheBlock:
    """One fixed-size block of KV memory.

    ``block_hash`` is set while the block is full and registered in the prefix
    cache; ``token_ids`` holds the block's tokens then, to verify hits. The block
    keeps both after being freed (lazy eviction) until it is reallocated.
    ``prev_free_block``/``next_free_block`` link it into the free queue.
    """

    block_id: int
    ref_cnt: int = 0
    block_hash: BlockHash | None = None
    token_ids: tuple[int, ...] | None = None
    prev_free_block: KVCacheBlock | None = field(default=None, repr=False)
    next_free_block: KVCacheBlock | None = field(default=None, repr=False)
    is_null: bool = False

    def reset_hash(self) -> None:
        self.block_hash = None
        self.token_ids = None

    @property
    def in_free_queue(self) -> bool:
        return self.prev_free_block is not None

    def __repr__(self) -> str:
        return (
            f"KVCacheBlock(block_id={self.block_id}, ref_cnt={self.ref_cnt}, "
            f"cached={self.block_hash is not None}, is_null={self.is_null})"
        )


class FreeKVCacheBlockQueue:
    """Intrusive doubly-linked list of free blocks, least recently freed first.

    The links live in the blocks themselves, so removing a block from the
    middle (a prefix hit on a free cached block) is O(1). Two sentinel blocks
    (id -1) bound the list, so no operation has to special-case the ends.
    """

    def __init__(self, blocks: Iterable[KVCacheBlock] = ()) -> None:
        self._head = KVCacheBlock(block_id=-1)
        self._tail = KVCacheBlock(block_id=-1)
        self._head.next_free_block = self._tail
        self._tail.prev_free_block = self._head
        self.num_free_blocks = 0
        self.append_n(blocks)

    def __len__(self) -> int:
        return self.num_free_blocks

    def popleft(self) -> KVCacheBlock:
        """Take the least recently freed block."""
        block = self._head.next_free_block
        assert block is not None
        if block is self._tail:
            raise ValueError("no free blocks left")
        self._unlink(block)
        return block

    def popleft_n(self, n: int) -> list[KVCacheBlock]:
        """Take the ``n`` least recently freed blocks, oldest first."""
        if n > self.num_free_blocks:
            raise ValueError(f"asked for {n} free blocks, only {self.num_free_blocks} left")
        blocks: list[KVCacheBlock] = []
        current = self._head.next_free_block
        for _ in range(n):
            assert current is not None and current is not self._tail
            blocks.append(current)
            following = current.next_free_block
            current.prev_free_block = current.next_free_block = None
            current = following
        self._head.next_free_block = current
        assert current is not None
        current.prev_free_block = self._head
        self.num_free_blocks -= n
        return blocks

    def remove(self, block: KVCacheBlock) -> None:
        """Take ``block`` out of the queue wherever it is, in O(1)."""
        if block.prev_free_block is None or block.next_free_block is None:
            raise ValueError(f"block {block.block_id} is not in the free queue")
        self._unlink(block)

    def append(self, block: KVCacheBlock) -> None:
        """Put ``block`` at the tail (evicted last)."""
        assert block.prev_free_block is None and block.next_free_block is None, (
            f"block {block.block_id} is already in the free queue"
        )
        last = self._tail.prev_free_block
        assert last is not None
        last.next_free_block = block
        block.prev_free_block = last
        block.next_free_block = self._tail
        self._tail.prev_free_block = block
        self.num_free_blocks += 1

    def appendleft(self, block: KVCacheBlock) -> None:
        """Put ``block`` at the head (evicted first)."""
        assert block.prev_free_block is None and block.next_free_block is None, (
            f"block {block.block_id} is already in the free queue"
        )
        first = self._head.next_free_block
        assert first is not None
        self._head.next_free_block = block
        block.prev_free_block = self._head
        block.next_free_block = first
        first.prev_free_block = block
        self.num_free_blocks += 1

    def append_n(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Append ``blocks`` at the tail, in order."""
        for block in blocks:
            self.append(block)

    def get_all_free_blocks(self) -> list[KVCacheBlock]:
        """The free blocks from head (next to evict) to tail."""
        blocks: list[KVCacheBlock] = []
        current = self._head.next_free_block
        while current is not None and current is not self._tail:
            blocks.append(current)
            current = current.next_free_block
        return blocks

    def _unlink(self, block: KVCacheBlock) -> None:
        prev_block = block.prev_free_block
        next_block = block.next_free_block
        assert prev_block is not None and next_block is not None
        prev_block.next_free_block = next_block
        next_block.prev_free_block = prev_block
        block.prev_free_block = block.next_free_block = None
        self.num_free_blocks -= 1
