"""Per-request KV cache blocks on top of the block pool, with prefix caching."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from pagedserve.core.block_pool import BlockPool
from pagedserve.core.kv_cache_utils import KVCacheBlock
from pagedserve.core.request import Request

logger = logging.getLogger(__name__)


@dataclass
class PrefixCacheStats:
    """Prefix cache lookups, counted in tokens.

    ``requests``: lookups made; ``queries``: tokens looked up (the request's
    num_tokens); ``hits``: tokens found in the cache.
    """

    requests: int = 0
    queries: int = 0
    hits: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0

    def record(self, num_queried_tokens: int, num_hit_tokens: int) -> None:
        self.requests += 1
        self.queries += num_queried_tokens
        self.hits += num_hit_tokens


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    """Allocates blocks to requests and finds prefix-cache hits.

    Each request owns a list of blocks (its block table row). Full blocks are
    registered in the prefix cache as soon as they are allocated for tokens that
    will be computed in the current step, so a request admitted in the same step
    (e.g. an n>1 sibling) shares them: the attention backend writes every K/V
    of a step before attending. Call ``mark_blocks_computed`` once a step has run
    (the scheduler does, in ``update_from_output``); until then, blocks registered
    for it leave the cache if their holders are freed.
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_caching: bool,
        max_model_len: int,
    ) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.max_model_len = max_model_len
        self.block_pool = BlockPool(num_blocks, enable_caching)
        self.req_to_blocks: dict[str, list[KVCacheBlock]] = {}
        self.req_to_block_ids: dict[str, list[int]] = {}
        # How many leading blocks of each request are registered in the prefix cache.
        self.num_cached_blocks: dict[str, int] = {}
        # Blocks registered since the last mark_blocks_computed(): their K/V is
        # written by the step being scheduled, which has not run yet.
        self._uncomputed_block_ids: set[int] = set()
        self._total_stats = PrefixCacheStats()
        self._interval_stats = PrefixCacheStats()

    # -- prefix cache -------------------------------------------------------------

    def get_computed_blocks(self, request: Request) -> tuple[list[KVCacheBlock], int]:
        """The longest cached prefix of ``request``: (blocks, num_computed_tokens).

        At most ``num_tokens - 1`` tokens (rounded down to whole blocks) are hits,
        so the last token is always computed and yields logits. No hits when
        caching is off or the request asks for prompt logprobs (those need every
        prompt position computed). The blocks are not yet referenced: pass them to
        ``allocate_slots``. Call ``record_prefix_cache_query`` once the request is
        admitted to count the lookup.
        """
        if not self.can_use_prefix_cache(request):
            return [], 0
        block_size = self.block_size
        max_num_hit_blocks = (request.num_tokens - 1) // block_size
        token_ids = request.all_token_ids
        computed_blocks: list[KVCacheBlock] = []
        for block_index, block_hash in enumerate(request.block_hashes[:max_num_hit_blocks]):
            begin = block_index * block_size
            block = self.block_pool.get_cached_block(
                block_hash, token_ids[begin : begin + block_size]
            )
            if block is None:
                break
            computed_blocks.append(block)
        return computed_blocks, len(computed_blocks) * block_size

    def can_use_prefix_cache(self, request: Request) -> bool:
        return self.enable_caching and request.sampling_params.prompt_logprobs is None

    def record_prefix_cache_query(self, request: Request, num_hit_tokens: int) -> None:
        """Count one prefix lookup of ``request`` (if it was eligible for one)."""
        if not self.can_use_prefix_cache(request):
            return
        self._total_stats.record(request.num_tokens, num_hit_tokens)
        self._interval_stats.record(request.num_tokens, num_hit_tokens)

    @property
    def prefix_cache_stats(self) -> PrefixCacheStats:
        """Totals since start (a copy)."""
        stats = self._total_stats
        return PrefixCacheStats(stats.requests, stats.queries, stats.hits)

    def make_prefix_cache_stats(self) -> PrefixCacheStats:
        """The stats since the previous call (for periodic metrics), then reset them."""
        stats = self._interval_stats
        self._interval_stats = PrefixCacheStats()
        return stats

    def reset_prefix_cache(self) -> bool:
        return self.block_pool.reset_prefix_cache()

    # -- allocation ---------------------------------------------------------------

    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        new_computed_blocks: list[KVCacheBlock] | None = None,
        num_new_computed_tokens: int = 0,
    ) -> list[int] | None:
        """Make room for ``num_new_tokens`` more tokens of ``request``.

        ``new_computed_blocks`` / ``num_new_computed_tokens`` are prefix hits from
        ``get_computed_blocks`` (only for a request being admitted). Returns the
        request's full block id list, or None when the pool cannot supply the
        blocks (nothing is allocated then). Blocks that will be full after this
        step are registered in the prefix cache.
        """
        if num_new_tokens <= 0:
            raise ValueError(f"num_new_tokens must be > 0, got {num_new_tokens}")
        request_id = request.request_id
        new_computed_blocks = new_computed_blocks or []
        req_blocks = self.req_to_blocks.get(request_id)
        num_existing_blocks = len(req_blocks) if req_blocks is not None else 0
        if new_computed_blocks:
            assert num_existing_blocks == 0, "prefix hits only for a request without blocks"
            assert num_new_computed_tokens == len(new_computed_blocks) * self.block_size
        num_computed_tokens = request.num_computed_tokens + num_new_computed_tokens
        num_total_tokens = num_computed_tokens + num_new_tokens
        if num_total_tokens > self.max_model_len:
            raise ValueError(
                f"request {request_id} would hold {num_total_tokens} tokens, more than "
                f"max_model_len={self.max_model_len}"
            )
        num_required_blocks = cdiv(num_total_tokens, self.block_size)
        num_new_blocks = num_required_blocks - num_existing_blocks - len(new_computed_blocks)
        # Hit blocks that sit in the free queue leave it when touched.
        num_free_hit_blocks = sum(1 for block in new_computed_blocks if block.ref_cnt == 0)
        if max(num_new_blocks, 0) > self.block_pool.get_num_free_blocks() - num_free_hit_blocks:
            return None

        if req_blocks is None:
            req_blocks = self.req_to_blocks[request_id] = []
            self.req_to_block_ids[request_id] = []
            self.num_cached_blocks[request_id] = 0
        block_ids = self.req_to_block_ids[request_id]
        if new_computed_blocks:
            self.block_pool.touch(new_computed_blocks)
            req_blocks.extend(new_computed_blocks)
            block_ids.extend(block.block_id for block in new_computed_blocks)
        if num_new_blocks > 0:
            new_blocks = self.block_pool.get_new_blocks(num_new_blocks)
            req_blocks.extend(new_blocks)
            block_ids.extend(block.block_id for block in new_blocks)

        if self.enable_caching:
            # The request keeps its block hashes current (the scheduler gave it a hasher).
            num_full_blocks = min(num_total_tokens, request.num_tokens) // self.block_size
            num_cached = self.num_cached_blocks[request_id]
            if num_full_blocks > num_cached:
                newly_cached = self.block_pool.cache_full_blocks(
                    request, req_blocks, num_cached, num_full_blocks, self.block_size
                )
                self.num_cached_blocks[request_id] = num_full_blocks
                self._uncomputed_block_ids.update(block.block_id for block in newly_cached)
        return list(block_ids)

    def mark_blocks_computed(self) -> None:
        """The step scheduled since the previous call has run: every block
        registered meanwhile now holds its K/V and may stay cached when freed."""
        self._uncomputed_block_ids.clear()

    def free(self, request: Request) -> None:
        """Release the request's blocks, tail first.

        The tail is reused first, so the shared head of a prompt survives longest.
        A block registered for the current step whose last holder leaves before
        the step ran (preempted right after being scheduled, or the step failed)
        leaves the prefix cache, so nobody can hit K/V that was never written.
        """
        request_id = request.request_id
        blocks = self.req_to_blocks.pop(request_id, None)
        self.req_to_block_ids.pop(request_id, None)
        self.num_cached_blocks.pop(request_id, None)
        if blocks is None:
            return
        uncomputed = self._uncomputed_block_ids
        if uncomputed:
            for block in blocks:
                if (
                    block.ref_cnt == 1
                    and block.block_hash is not None
                    and block.block_id in uncomputed
                ):
                    self.block_pool.uncache_block(block)
        self.block_pool.free_blocks(reversed(blocks))

    # -- queries ------------------------------------------------------------------

    def get_blocks(self, request_id: str) -> list[KVCacheBlock]:
        return self.req_to_blocks.get(request_id, [])

    def get_num_blocks(self, request_id: str) -> int:
        """How many blocks the request holds (the length of its block table row)."""
        block_ids = self.req_to_block_ids.get(request_id)
        return len(block_ids) if block_ids is not None else 0

    def get_block_ids(self, request_id: str) -> list[int]:
        """The request's block table row (a copy); empty when it holds no blocks."""
        return list(self.req_to_block_ids.get(request_id, ()))

    @property
    def num_free_blocks(self) -> int:
        return self.block_pool.get_num_free_blocks()

    @property
    def usage(self) -> float:
        """Fraction of usable blocks in use, 0..1."""
        return self.block_pool.get_usage()
