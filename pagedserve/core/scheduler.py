"""The scheduler: decides each step which requests compute how many tokens."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from pagedserve.config import CacheConfig, KVCacheConfig, SchedulerConfig
from pagedserve.core.kv_cache_manager import KVCacheManager, PrefixCacheStats
from pagedserve.core.kv_cache_utils import BlockHasher
from pagedserve.core.request import Request, RequestStatus
from pagedserve.core.request_queue import create_request_queue
from pagedserve.core.sched_output import (
    CachedRequestData,
    ModelRunnerOutput,
    NewRequestData,
    SchedulerOutput,
)
from pagedserve.core.step_cost import StepBudget, StepShape

logger = logging.getLogger(__name__)


@dataclass
class _StepPlan:
    """The step being scheduled: what is in the batch so far and the budgets left.

    ``token_budget`` is every token of the step (the hard cap); ``prefill_budget`` the
    share of requests scheduled for more than one token (prefill chunks), which the step
    budget sizes; without one it never binds before ``token_budget``.
    """

    token_budget: int
    prefill_budget: int
    cached_reqs: CachedRequestData = field(default_factory=CachedRequestData)
    new_reqs: list[NewRequestData] = field(default_factory=list)
    num_scheduled_tokens: dict[str, int] = field(default_factory=dict)
    preempted: bool = False

    def add_tokens(self, request_id: str, num_new_tokens: int, is_prefill: bool) -> None:
        self.num_scheduled_tokens[request_id] = num_new_tokens
        self.token_budget -= num_new_tokens
        if is_prefill:
            self.prefill_budget -= num_new_tokens

    def budget_for(self, is_prefill: bool) -> int:
        """Tokens one more request may take: a prefill also within the prefill budget."""
        return min(self.token_budget, self.prefill_budget) if is_prefill else self.token_budget

    def unschedule(self, request_id: str) -> None:
        """Take a running request scheduled earlier in this step back out of the batch."""
        num_tokens = self.num_scheduled_tokens.pop(request_id, None)
        if num_tokens is not None:
            self.token_budget += num_tokens
            if num_tokens > 1:
                self.prefill_budget += num_tokens
            self.cached_reqs.remove(request_id)


class Scheduler:
    """Continuous batching with chunked prefill, prefix caching and preemption.

    Each step has one token budget (``max_num_batched_tokens``) and one sequence
    cap (``max_num_seqs``). Running requests are scheduled first (a decode costs
    one token, a request still in prefill continues with its next chunk), then
    waiting requests are admitted in queue order while budget and blocks remain.
    When a running request cannot get blocks, the lowest-priority, most recently
    arrived running request is preempted by recompute, and nothing new is admitted
    in that step.

    With a ``step_budget`` (see :mod:`pagedserve.core.step_cost`), the tokens of
    requests scheduled for more than one token (prefill chunks, running or newly
    admitted) share a per-step prefill budget sized so that the predicted step time
    stays under a latency target; decodes always run. The engine core reports each
    step's measured time with :meth:`record_step_time`.
    """

    def __init__(
        self,
        scheduler_config: SchedulerConfig,
        cache_config: CacheConfig,
        kv_cache_config: KVCacheConfig,
        step_budget: StepBudget | None = None,
    ) -> None:
        if kv_cache_config.block_size != cache_config.block_size:
            raise ValueError(
                f"the KV cache has blocks of {kv_cache_config.block_size} tokens, "
                f"block_size is {cache_config.block_size}"
            )
        self.scheduler_config = scheduler_config
        self.cache_config = cache_config
        self.kv_cache_config = kv_cache_config
        self.max_num_seqs = scheduler_config.max_num_seqs
        self.max_num_batched_tokens = scheduler_config.max_num_batched_tokens
        self.max_model_len = scheduler_config.max_model_len
        self.long_prefill_token_threshold = scheduler_config.long_prefill_token_threshold
        self.policy = scheduler_config.policy
        self.step_budget = step_budget
        self.block_size = cache_config.block_size
        self.enable_caching = cache_config.enable_prefix_caching
        # Requests hash their full blocks as tokens arrive (prefix caching only).
        self.block_hasher = BlockHasher(cache_config.block_size) if self.enable_caching else None
        self.kv_cache_manager = KVCacheManager(
            num_blocks=kv_cache_config.num_blocks,
            block_size=cache_config.block_size,
            enable_caching=cache_config.enable_prefix_caching,
            max_model_len=scheduler_config.max_model_len,
        )
        # Unfinished requests by id.
        self.requests: dict[str, Request] = {}
        self.waiting = create_request_queue(self.policy)
        # Running requests in admission order.
        self.running: list[Request] = []
        # Since the last schedule(): the runner drops its state for these.
        self.finished_req_ids: set[str] = set()
        self.preempted_req_ids: set[str] = set()
        self.num_preemptions = 0

    # -- requests -----------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        """Queue a new request (its prompt was validated by the engine)."""
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        if request.num_tokens < 1:
            raise ValueError(f"request {request.request_id!r} has an empty prompt")
        if request.num_tokens > self.max_model_len:
            raise ValueError(
                f"request {request.request_id!r} has {request.num_tokens} tokens, more than "
                f"max_model_len={self.max_model_len}"
            )
        request.status = RequestStatus.WAITING
        if self.block_hasher is not None:
            request.set_block_hasher(self.block_hasher)
        self.requests[request.request_id] = request
        self.waiting.add_request(request)

    def get_request(self, request_id: str) -> Request | None:
        return self.requests.get(request_id)

    def finish_requests(
        self, request_ids: str | Iterable[str], finished_status: RequestStatus
    ) -> list[Request]:
        """Finish (typically abort) waiting or running requests; unknown ids are ignored.

        Their blocks return to the pool at once. Returns the requests finished.
        """
        if not RequestStatus.is_finished(finished_status):
            raise ValueError(f"finish_requests needs a FINISHED_* status, got {finished_status!r}")
        if isinstance(request_ids, str):
            request_ids = (request_ids,)
        running_to_remove: set[int] = set()
        waiting_to_remove: list[Request] = []
        finished: list[Request] = []
        for request_id in request_ids:
            request = self.requests.get(request_id)
            if request is None or request.is_finished():
                continue
            if request.status == RequestStatus.RUNNING:
                running_to_remove.add(id(request))
            else:
                waiting_to_remove.append(request)
            request.status = finished_status
            finished.append(request)
        if running_to_remove:
            self.running = [r for r in self.running if id(r) not in running_to_remove]
        if waiting_to_remove:
            self.waiting.remove_requests(waiting_to_remove)
        for request in finished:
            self._free_request(request)
        return finished

    def _free_request(self, request: Request) -> None:
        assert request.is_finished()
        self.kv_cache_manager.free(request)
        self.finished_req_ids.add(request.request_id)
        del self.requests[request.request_id]

    # -- the step -----------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        """Decide this step's work. See the class docstring for the policy."""
        step = _StepPlan(
            token_budget=self.max_num_batched_tokens,
            prefill_budget=self._prefill_token_budget(),
        )
        self._schedule_running(step)
        if not step.preempted:
            self._schedule_waiting(step)
        scheduler_output = SchedulerOutput(
            scheduled_new_reqs=step.new_reqs,
            scheduled_cached_reqs=step.cached_reqs,
            num_scheduled_tokens=step.num_scheduled_tokens,
            total_num_scheduled_tokens=self.max_num_batched_tokens - step.token_budget,
            finished_req_ids=self.finished_req_ids,
            preempted_req_ids=self.preempted_req_ids,
        )
        assert scheduler_output.total_num_scheduled_tokens == sum(
            step.num_scheduled_tokens.values()
        )
        self.finished_req_ids = set()
        self.preempted_req_ids = set()
        return scheduler_output

    def _prefill_token_budget(self) -> int:
        """This step's budget for prefill chunks: all of it without a step budget, else
        what the step budget allows beside the running requests' decodes."""
        if self.step_budget is None:
            return self.max_num_batched_tokens
        num_decode_reqs = num_decode_context_tokens = num_backlog_tokens = 0
        for request in self.running:
            num_new_tokens = request.num_tokens - request.num_computed_tokens
            if num_new_tokens == 1:
                num_decode_reqs += 1
                num_decode_context_tokens += request.num_tokens
            else:
                num_backlog_tokens += num_new_tokens
        for request in self.waiting:
            num_backlog_tokens += request.num_tokens - request.num_computed_tokens
        return self.step_budget.prefill_token_budget(
            num_decode_reqs, num_decode_context_tokens, num_backlog_tokens
        )

    def _num_new_tokens(
        self, request: Request, num_computed_tokens: int, step: _StepPlan
    ) -> tuple[int, bool]:
        """Tokens to schedule for ``request`` this step, and whether they are a prefill
        chunk (more than one token to compute, so the prefill budget applies)."""
        num_new_tokens = request.num_tokens - num_computed_tokens
        is_prefill = num_new_tokens > 1
        threshold = self.long_prefill_token_threshold
        if 0 < threshold < num_new_tokens:
            num_new_tokens = threshold
        budget = step.budget_for(is_prefill)
        return min(num_new_tokens, budget, self.max_model_len - num_computed_tokens), is_prefill

    def _schedule_running(self, step: _StepPlan) -> None:
        """Running requests, in admission order; preempt when blocks run out."""
        kv_cache_manager = self.kv_cache_manager
        req_index = 0
        while req_index < len(self.running) and step.token_budget > 0:
            request = self.running[req_index]
            num_new_tokens, is_prefill = self._num_new_tokens(
                request, request.num_computed_tokens, step
            )
            if num_new_tokens <= 0:
                req_index += 1
                continue
            num_old_blocks = kv_cache_manager.get_num_blocks(request.request_id)
            while True:
                block_ids = kv_cache_manager.allocate_slots(request, num_new_tokens)
                if block_ids is not None:
                    break
                victim_index = self._select_victim_index()
                victim = self.running.pop(victim_index)
                step.unschedule(victim.request_id)
                if victim_index < req_index:
                    req_index -= 1
                self._preempt(victim)
                step.preempted = True
                if victim is request:
                    break
            if block_ids is None:
                # The request preempted itself; the one now at req_index is next.
                continue
            step.cached_reqs.append(
                request.request_id, block_ids[num_old_blocks:], request.num_computed_tokens
            )
            step.add_tokens(request.request_id, num_new_tokens, is_prefill)
            req_index += 1

    def _schedule_waiting(self, step: _StepPlan) -> None:
        """Admit waiting requests in queue order while budgets, seats and blocks remain."""
        kv_cache_manager = self.kv_cache_manager
        while (
            self.waiting
            and min(step.token_budget, step.prefill_budget) > 0
            and len(self.running) < self.max_num_seqs
        ):
            request = self.waiting.peek_request()
            if request.num_computed_tokens == 0:
                computed_blocks, num_hit_tokens = kv_cache_manager.get_computed_blocks(request)
            else:
                computed_blocks, num_hit_tokens = [], 0
            num_computed_tokens = request.num_computed_tokens + num_hit_tokens
            num_new_tokens, is_prefill = self._num_new_tokens(request, num_computed_tokens, step)
            assert num_new_tokens > 0
            block_ids = kv_cache_manager.allocate_slots(
                request, num_new_tokens, computed_blocks, num_hit_tokens
            )
            if block_ids is None:
                # Out of blocks: keep queue order, admit nothing further.
                break
            self.waiting.pop_request()
            kv_cache_manager.record_prefix_cache_query(request, num_hit_tokens)
            request.num_computed_tokens = num_computed_tokens
            request.status = RequestStatus.RUNNING
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = num_hit_tokens
            if request.first_scheduled_time is None:
                request.first_scheduled_time = time.time()
            self.running.append(request)
            step.new_reqs.append(
                NewRequestData(
                    req_id=request.request_id,
                    prompt_token_ids=request.prompt_token_ids,
                    sampling_params=request.sampling_params,
                    block_ids=block_ids,
                    num_computed_tokens=num_computed_tokens,
                    output_token_ids=list(request.output_token_ids),
                )
            )
            step.add_tokens(request.request_id, num_new_tokens, is_prefill)

    def _select_victim_index(self) -> int:
        """The running request to preempt: the last arrived (fcfs), or the one with
        the largest priority value, latest arrival breaking ties (priority)."""
        if self.policy == "priority":
            return max(
                range(len(self.running)),
                key=lambda i: (self.running[i].priority, self.running[i].arrival_time, i),
            )
        return len(self.running) - 1

    def _preempt(self, request: Request) -> None:
        """Recompute-preempt: free its blocks and put it at the front of the queue."""
        self.kv_cache_manager.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.preempted_req_ids.add(request.request_id)
        self.waiting.prepend_request(request)
        if self.num_preemptions == 1:
            logger.warning(
                "request %s preempted (recompute): not enough KV cache blocks. This hurts "
                "throughput; give the KV cache more memory or lower max_num_seqs / "
                "max_num_batched_tokens.",
                request.request_id,
            )
        else:
            logger.info(
                "request %s preempted (recompute); %d preemptions in total",
                request.request_id,
                self.num_preemptions,
            )

    def update_from_output(
        self, scheduler_output: SchedulerOutput, model_runner_output: ModelRunnerOutput
    ) -> list[Request]:
        """Apply a finished step: advance progress, append sampled tokens, check stops.

        Returns the requests that got a new token or finished this step, in batch
        order. Finished requests leave the running list and free their blocks.
        """
        self.kv_cache_manager.mark_blocks_computed()
        sampled_token_ids = model_runner_output.sampled_token_ids
        num_scheduled_tokens = scheduler_output.num_scheduled_tokens
        outputs: list[Request] = []
        stopped: set[int] = set()
        for request_id in scheduler_output.scheduled_req_ids:
            request = self.requests.get(request_id)
            if request is None or request.status != RequestStatus.RUNNING:
                # Aborted while the step ran.
                continue
            request.num_computed_tokens += num_scheduled_tokens[request_id]
            assert request.num_computed_tokens <= request.num_tokens
            token_id = sampled_token_ids.get(request_id)
            if token_id is None:
                continue
            assert request.num_computed_tokens == request.num_tokens, (
                f"{request_id}: a token was sampled for a partial prefill chunk"
            )
            request.append_output_token_ids(int(token_id))
            if request.structured_output is not None and not request.structured_output.accept_token(
                int(token_id)
            ):
                logger.warning(
                    "%s: the sampled token %d breaks its structured-output constraint (%s); "
                    "finishing it", request_id, token_id, request.structured_output.error,
                )
                request.status = RequestStatus.FINISHED_STOPPED
                stopped.add(id(request))
                self._free_request(request)
                outputs.append(request)
                continue
            if self._check_stop(request):
                stopped.add(id(request))
                self._free_request(request)
            outputs.append(request)
        if stopped:
            self.running = [r for r in self.running if id(r) not in stopped]
        return outputs

    def _check_stop(self, request: Request) -> bool:
        """Set a FINISHED_* status when the request is done.

        Stop tokens count only once ``min_tokens`` tokens (including the one just
        sampled) exist; EOS gives stop_reason None, a stop_token_ids hit gives the
        token id. Then max_tokens and max_model_len cap the length. (A structured-output
        request whose grammar is complete may sample nothing but EOS next, as in vLLM.)
        """
        sampling_params = request.sampling_params
        if request.num_output_tokens >= sampling_params.min_tokens:
            last_token_id = request.output_token_ids[-1]
            if last_token_id in sampling_params.stop_token_ids:
                request.status = RequestStatus.FINISHED_STOPPED
                request.stop_reason = last_token_id
                return True
            if not sampling_params.ignore_eos and last_token_id in sampling_params.all_stop_token_ids:
                request.status = RequestStatus.FINISHED_STOPPED
                request.stop_reason = None
                return True
        if (
            request.num_output_tokens >= request.max_tokens
            or request.num_tokens >= self.max_model_len
        ):
            request.status = RequestStatus.FINISHED_LENGTH_CAPPED
            return True
        return False

    def record_step_time(self, scheduler_output: SchedulerOutput, seconds: float) -> None:
        """The measured duration of a scheduled step, for the step budget's cost model."""
        if self.step_budget is not None and not scheduler_output.is_empty:
            self.step_budget.observe(StepShape.of(scheduler_output), seconds)

    # -- state --------------------------------------------------------------------

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_unfinished_requests(self) -> bool:
        return bool(self.running) or bool(self.waiting)

    def get_num_unfinished_requests(self) -> int:
        return len(self.running) + len(self.waiting)

    @property
    def kv_cache_usage(self) -> float:
        """Fraction of usable KV blocks in use, 0..1."""
        return self.kv_cache_manager.usage

    @property
    def prefix_cache_stats(self) -> PrefixCacheStats:
        """Prefix cache queries and hits in tokens, totals since start."""
        return self.kv_cache_manager.prefix_cache_stats

    def make_prefix_cache_stats(self) -> PrefixCacheStats:
        """Prefix cache stats since the previous call (for periodic metrics)."""
        return self.kv_cache_manager.make_prefix_cache_stats()

    def reset_prefix_cache(self) -> bool:
        """Forget all cached blocks; only possible while no block is in use."""
        return self.kv_cache_manager.reset_prefix_cache()
