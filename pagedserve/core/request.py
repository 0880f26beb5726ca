"""A request's state inside the engine core."""

from __future__ import annotations

import enum
import time
from typing import Any

from pagedserve.core.kv_cache_utils import BlockHash, BlockHasher
from pagedserve.sampling_params import SamplingParams


class RequestStatus(enum.IntEnum):
    """Where a request is in its life. Values above PREEMPTED are finished."""

    WAITING = enum.auto()
    RUNNING = enum.auto()
    PREEMPTED = enum.auto()
    FINISHED_STOPPED = enum.auto()
    FINISHED_LENGTH_CAPPED = enum.auto()
    FINISHED_ABORTED = enum.auto()
    FINISHED_ERROR = enum.auto()

    @staticmethod
    def is_finished(status: RequestStatus) -> bool:
        return status > RequestStatus.PREEMPTED

    @staticmethod
    def get_finished_reason(status: RequestStatus) -> str | None:
        return _FINISHED_REASONS.get(status)


_FINISHED_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH_CAPPED: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_ERROR: "error",
}


class Request:
    """One sequence being generated.

    Progress is one number: ``num_computed_tokens`` counts the tokens of
    ``all_token_ids`` whose KV is in the cache. Each step the scheduler gives the
    request ``num_tokens - num_computed_tokens`` (capped) new tokens to compute.

    With a block hasher (prefix caching on), the request keeps ``block_hashes``, the
    chained hashes of its full blocks, current as tokens arrive.
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        arrival_time: float | None = None,
        priority: int = 0,
        cache_salt: str | None = None,
        block_hasher: BlockHasher | None = None,
    ) -> None:
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.arrival_time = time.time() if arrival_time is None else arrival_time
        self.priority = priority
        self.cache_salt = cache_salt
        self.status = RequestStatus.WAITING
        self.stop_reason: int | str | None = None
        self.max_tokens = (
            sampling_params.max_tokens if sampling_params.max_tokens is not None else 1 << 30
        )
        self._output_token_ids: list[int] = []
        self._all_token_ids: list[int] = list(self.prompt_token_ids)
        self.num_computed_tokens = 0
        # Tokens found in the prefix cache when first scheduled; -1 until then.
        self.num_cached_tokens = -1
        self.num_preemptions = 0
        # Chained hashes of the full blocks of all_token_ids, appended as tokens arrive.
        # Structured outputs: the request's grammar matcher (set by the engine core).
        self.structured_output: Any = None
        self.block_hashes: list[BlockHash] = []
        self.block_hasher: BlockHasher | None = None
        if block_hasher is not None:
            self.set_block_hasher(block_hasher)
        # Set by the engine: timestamps for metrics.
        self.first_scheduled_time: float | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self._all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self._output_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        """Read-only view by convention: mutate only through append_output_token_ids."""
        return self._output_token_ids

    @property
    def all_token_ids(self) -> list[int]:
        return self._all_token_ids

    def append_output_token_ids(self, token_ids: int | list[int]) -> None:
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        self._output_token_ids.extend(token_ids)
        self._all_token_ids.extend(token_ids)
        if self.block_hasher is not None:
            self._hash_new_full_blocks()

    def set_block_hasher(self, block_hasher: BlockHasher) -> None:
        """Hash this request's full blocks with ``block_hasher``, now and as tokens arrive."""
        if self.block_hasher is not None and self.block_hasher.block_size != block_hasher.block_size:
            self.block_hashes = []
        self.block_hasher = block_hasher
        self._hash_new_full_blocks()

    def _hash_new_full_blocks(self) -> None:
        assert self.block_hasher is not None
        self.block_hashes.extend(
            self.block_hasher(self._all_token_ids, self.block_hashes, self.cache_salt)
        )

    def is_finished(self) -> bool:
        return RequestStatus.is_finished(self.status)

    def get_finished_reason(self) -> str | None:
        return RequestStatus.get_finished_reason(self.status)

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, status={self.status.name}, "
            f"num_tokens={self.num_tokens}, num_computed_tokens={self.num_computed_tokens})"
        )
