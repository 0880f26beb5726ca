"""Model-free helpers for the core tests: requests, schedulers, a fake model runner
that simulates the paged KV cache, and the block accounting invariant check."""

from __future__ import annotations

import zlib
from collections import Counter
from collections.abc import Callable

from pagedserve.config import CacheConfig, KVCacheConfig, SchedulerConfig
from pagedserve.core.request import Request, RequestStatus
from pagedserve.core.sched_output import ModelRunnerOutput, SchedulerOutput
from pagedserve.core.scheduler import Scheduler
from pagedserve.core.step_cost import StepBudget
from pagedserve.sampling_params import SamplingParams

EOS_TOKEN_ID = 2
VOCAB_SIZE = 1000


def make_request(
    request_id: str,
    prompt_token_ids: list[int],
    *,
    max_tokens: int | None = 16,
    arrival_time: float | None = None,
    priority: int = 0,
    cache_salt: str | None = None,
    eos_token_ids: set[int] | None = None,
    **sampling_kwargs: object,
) -> Request:
    params = SamplingParams(max_tokens=max_tokens, **sampling_kwargs)  # type: ignore[arg-type]
    if eos_token_ids:
        params.update_from_generation_config(eos_token_ids)
    return Request(
        request_id,
        prompt_token_ids,
        params,
        arrival_time=arrival_time,
        priority=priority,
        cache_salt=cache_salt,
    )


def make_scheduler(
    *,
    num_blocks: int = 64,
    block_size: int = 4,
    max_num_seqs: int = 16,
    max_num_batched_tokens: int = 64,
    max_model_len: int = 256,
    long_prefill_token_threshold: int = 0,
    policy: str = "fcfs",
    enable_prefix_caching: bool = True,
    step_budget: StepBudget | None = None,
) -> Scheduler:
    return Scheduler(
        SchedulerConfig(
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            max_model_len=max_model_len,
            long_prefill_token_threshold=long_prefill_token_threshold,
            policy=policy,
        ),
        CacheConfig(block_size=block_size, enable_prefix_caching=enable_prefix_caching),
        make_kv_cache_config(num_blocks, block_size),
        step_budget=step_budget,
    )


def make_kv_cache_config(num_blocks: int, block_size: int) -> KVCacheConfig:
    """A KV cache of ``num_blocks`` blocks (as the model runner would size it)."""
    bytes_per_block = 1024
    return KVCacheConfig(
        num_blocks=num_blocks,
        block_size=block_size,
        bytes_per_block=bytes_per_block,
        kv_cache_memory_bytes=num_blocks * bytes_per_block,
    )


def default_next_token(request: Request) -> int:
    """A deterministic 'model': depends only on the request id and its length.

    Never returns EOS or small ids (tests use ids < 10 as stop tokens).
    """
    key = f"{request.request_id}:{request.num_tokens}".encode()
    return 10 + zlib.crc32(key) % (VOCAB_SIZE - 10)


class FakeModelRunner:
    """Simulates the model runner and its paged KV cache, without a model.

    Like the real runner it works only from the plain data of each SchedulerOutput:
    it keeps its own token ids and block table per request (rebuilt from
    ``NewRequestData``, extended by ``CachedRequestData``'s new block ids and the
    tokens it samples), and checks that they equal the scheduler's view every step.
    Every slot holds the (position, token id) written into it. A step first writes
    the scheduled tokens of every request (as the attention backend does), then
    checks that each scheduled request's whole context reads back its own tokens
    through its block table, i.e. that prefix hits, sharing and preemption never
    hand a request someone else's K/V. A token is sampled for a request whose
    scheduled chunk reaches the end of its known tokens.
    """

    def __init__(
        self,
        scheduler: Scheduler,
        next_token: Callable[[Request], int] = default_next_token,
    ) -> None:
        self.scheduler = scheduler
        self.block_size = scheduler.block_size
        self.slots: list[tuple[int, int] | None] = [None] * (
            scheduler.kv_cache_config.num_blocks * self.block_size
        )
        self.next_token = next_token
        # The runner's own state per request, from the scheduler outputs only.
        self.block_tables: dict[str, list[int]] = {}
        self.token_ids: dict[str, list[int]] = {}
        self.num_computed_tokens: dict[str, int] = {}

    def slot(self, block_ids: list[int], position: int) -> int:
        return block_ids[position // self.block_size] * self.block_size + position % self.block_size

    def update_states(self, scheduler_output: SchedulerOutput) -> None:
        for request_id in scheduler_output.finished_req_ids:
            self.block_tables.pop(request_id, None)
            self.token_ids.pop(request_id, None)
        for request_id in scheduler_output.preempted_req_ids:
            self.block_tables.pop(request_id, None)
        for new in scheduler_output.scheduled_new_reqs:
            self.block_tables[new.req_id] = list(new.block_ids)
            self.token_ids[new.req_id] = new.prompt_token_ids + new.output_token_ids
            self.num_computed_tokens[new.req_id] = new.num_computed_tokens
        cached = scheduler_output.scheduled_cached_reqs
        for request_id, new_block_ids, num_computed in zip(
            cached.req_ids, cached.new_block_ids, cached.num_computed_tokens, strict=True
        ):
            self.block_tables[request_id].extend(new_block_ids)
            self.num_computed_tokens[request_id] = num_computed
        # The plain data rebuilt exactly the scheduler's view.
        for request_id in scheduler_output.scheduled_req_ids:
            request = self.scheduler.requests[request_id]
            assert self.token_ids[request_id] == request.all_token_ids, request_id
            assert self.num_computed_tokens[request_id] == request.num_computed_tokens
            manager = self.scheduler.kv_cache_manager
            assert self.block_tables[request_id] == manager.get_block_ids(request_id)

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        self.update_states(scheduler_output)
        written: dict[int, str] = {}
        num_scheduled_tokens = scheduler_output.num_scheduled_tokens
        for request_id in scheduler_output.scheduled_req_ids:
            block_ids = self.block_tables[request_id]
            token_ids = self.token_ids[request_id]
            num_new_tokens = num_scheduled_tokens[request_id]
            start = self.num_computed_tokens[request_id]
            assert num_new_tokens > 0
            assert 0 not in block_ids, "the null block was handed out"
            assert len(block_ids) * self.block_size >= start + num_new_tokens
            for position in range(start, start + num_new_tokens):
                slot = self.slot(block_ids, position)
                owner = written.setdefault(slot, request_id)
                assert owner == request_id, f"{owner} and {request_id} both wrote slot {slot}"
                self.slots[slot] = (position, token_ids[position])
        sampled: dict[str, int] = {}
        for request_id in scheduler_output.scheduled_req_ids:
            end = self.num_computed_tokens[request_id] + num_scheduled_tokens[request_id]
            token_ids = self.token_ids[request_id]
            self.check_context(request_id, token_ids, self.block_tables[request_id], end)
            if end == len(token_ids):
                sampled[request_id] = self.next_token(self.scheduler.requests[request_id])
                token_ids.append(sampled[request_id])
        return ModelRunnerOutput(sampled_token_ids=sampled)

    def check_context(
        self, request_id: str, token_ids: list[int], block_ids: list[int], end: int
    ) -> None:
        for position in range(end):
            stored = self.slots[self.slot(block_ids, position)]
            assert stored == (position, token_ids[position]), (
                f"{request_id}: position {position} holds {stored}, "
                f"expected {(position, token_ids[position])}"
            )

    def check_all_running(self) -> None:
        """Every running request's computed context is intact."""
        manager = self.scheduler.kv_cache_manager
        for request in self.scheduler.running:
            block_ids = manager.get_block_ids(request.request_id)
            self.check_context(
                request.request_id, request.all_token_ids, block_ids, request.num_computed_tokens
            )

    def step(self) -> tuple[SchedulerOutput, list[Request]]:
        scheduler_output = self.scheduler.schedule()
        runner_output = self.execute_model(scheduler_output)
        return scheduler_output, self.scheduler.update_from_output(
            scheduler_output, runner_output
        )

    def run_until_done(self, max_steps: int = 10_000) -> list[SchedulerOutput]:
        outputs: list[SchedulerOutput] = []
        while self.scheduler.has_unfinished_requests():
            assert len(outputs) < max_steps, "the scheduler made no progress"
            scheduler_output, _ = self.step()
            outputs.append(scheduler_output)
        return outputs


def check_block_accounting(scheduler: Scheduler) -> None:
    """Every block is either free (ref 0, in the free queue exactly once) or owned
    (ref count == number of requests holding it); the null block is never handed out."""
    manager = scheduler.kv_cache_manager
    pool = manager.block_pool
    holders: Counter[int] = Counter()
    running_ids = {request.request_id for request in scheduler.running}
    assert len(running_ids) == len(scheduler.running), "a request runs twice"
    assert set(manager.req_to_blocks) == running_ids, "only running requests hold blocks"
    for request_id, blocks in manager.req_to_blocks.items():
        block_ids = [block.block_id for block in blocks]
        assert block_ids == manager.get_block_ids(request_id)
        assert len(set(block_ids)) == len(block_ids), f"{request_id} holds a block twice"
        request = scheduler.requests[request_id]
        assert request.status == RequestStatus.RUNNING
        assert len(blocks) * manager.block_size >= request.num_computed_tokens
        holders.update(block_ids)
    for request in scheduler.waiting:
        assert not request.is_finished() and request.status != RequestStatus.RUNNING
        assert request.num_computed_tokens == 0
        assert request.request_id not in manager.req_to_blocks
    assert scheduler.get_num_unfinished_requests() == len(scheduler.requests)

    free_blocks = pool.free_block_queue.get_all_free_blocks()
    free_ids = [block.block_id for block in free_blocks]
    assert len(free_ids) == len(set(free_ids)) == pool.get_num_free_blocks()
    assert 0 not in free_ids and 0 not in holders
    assert pool.null_block.ref_cnt == 0 and not pool.null_block.in_free_queue
    free_set = set(free_ids)
    for block in pool.blocks[1:]:
        if block.block_id in holders:
            assert block.ref_cnt == holders[block.block_id], block
            assert block.block_id not in free_set
        else:
            assert block.ref_cnt == 0, block
            assert block.block_id in free_set
    assert pool.get_num_free_blocks() + len(holders) == pool.num_blocks - 1

    cached_ids: set[int] = set()
    for block_hash, blocks_by_id in pool.cached_block_hash_to_block.items():
        assert blocks_by_id, "empty entry left in the prefix cache map"
        for block_id, block in blocks_by_id.items():
            assert block is pool.blocks[block_id] and block.block_hash == block_hash
            cached_ids.add(block_id)
    assert cached_ids == {b.block_id for b in pool.blocks if b.block_hash is not None}
