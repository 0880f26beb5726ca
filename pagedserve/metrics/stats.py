"""Per-step and per-request statistics computed in the front end, as vLLM v1 does.

The engine core reports ``SchedulerStats`` (queue depth, KV usage, running totals of
prefix-cache queries/hits and preemptions) with every step. The front end turns each
step's ``EngineCoreOutput``s into one ``IterationStats``: tokens counted, time to first
token and inter-token latencies observed, and one ``FinishedRequestStats`` per request
that ended in the step. Stat loggers (Prometheus, the periodic log line) consume both.

Hooks the output processor calls (all O(1) per output)::

    iteration_stats = IterationStats()                      # once per engine-core step
    iteration_stats.update_from_output(output, core_timestamp, prompt_len, req_stats)
    iteration_stats.update_from_finished_request(finish_reason, prompt_len,
                                                 max_tokens, req_stats)
    iteration_stats.update_from_finished_parent(n, max_num_generation_tokens)

Timestamps are ``time.time()`` of the host: the API process and the engine core run on
one machine, so the front end's arrival time and the core's scheduling time compare.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

# vLLM's finished_reason label values (request_success is pre-initialized with these).
FINISH_REASONS = ("stop", "length", "abort", "error")


class _CoreOutput(Protocol):
    """What IterationStats reads of an EngineCoreOutput (engine/messages.py)."""

    new_token_ids: list[int]
    first_scheduled_time: float | None
    num_preemptions: int


@dataclass(slots=True)
class RequestStateStats:
    """Timestamps and counts of one (child) request, kept beside its output state."""

    arrival_time: float = 0.0
    # Engine-core wall-clock times (0.0 = not yet).
    scheduled_ts: float = 0.0
    first_token_ts: float = 0.0
    last_token_ts: float = 0.0
    num_generation_tokens: int = 0
    # Front-end latency to the first token (arrival -> first token processed here).
    first_token_latency: float = 0.0
    num_preemptions: int = 0

    @property
    def is_prefilling(self) -> bool:
        """No output token yet: the next output with tokens is the first one."""
        return self.num_generation_tokens == 0


@dataclass(slots=True)
class FinishedRequestStats:
    """What a request's life measured, recorded when it finishes."""

    finish_reason: str
    e2e_latency: float = 0.0
    num_prompt_tokens: int = 0
    num_generation_tokens: int = 0
    max_tokens_param: int | None = None
    queued_time: float = 0.0
    prefill_time: float = 0.0
    inference_time: float = 0.0
    decode_time: float = 0.0
    mean_time_per_output_token: float = 0.0
    num_cached_tokens: int = 0
    num_preemptions: int = 0


@dataclass(slots=True)
class IterationStats:
    """Stats of one engine-core step, as seen by the front end."""

    iteration_timestamp: float = field(default_factory=time.time)
    num_generation_tokens: int = 0
    num_prompt_tokens: int = 0
    num_preempted_reqs: int = 0
    finished_requests: list[FinishedRequestStats] = field(default_factory=list)
    max_num_generation_tokens_iter: list[int] = field(default_factory=list)
    n_params_iter: list[int] = field(default_factory=list)
    time_to_first_tokens_iter: list[float] = field(default_factory=list)
    inter_token_latencies_iter: list[float] = field(default_factory=list)

    def _time_since(self, start: float) -> float:
        return max(0.0, self.iteration_timestamp - start)

    def update_from_output(
        self,
        output: _CoreOutput,
        engine_core_timestamp: float,
        prompt_len: int,
        req_stats: RequestStateStats,
    ) -> None:
        """Account one request's output of this step (before the output state changes)."""
        if output.first_scheduled_time is not None and req_stats.scheduled_ts == 0.0:
            req_stats.scheduled_ts = output.first_scheduled_time
        if output.num_preemptions > req_stats.num_preemptions:
            self.num_preempted_reqs += output.num_preemptions - req_stats.num_preemptions
            req_stats.num_preemptions = output.num_preemptions
        num_new_tokens = len(output.new_token_ids)
        if num_new_tokens == 0:
            # Prompt logprobs of a partial prefill chunk, or an abort/error notice.
            return
        self.num_generation_tokens += num_new_tokens
        if req_stats.is_prefilling:
            # As vLLM: the whole prompt counts in the step that produced the first token.
            self.num_prompt_tokens += prompt_len
            first_token_latency = self._time_since(req_stats.arrival_time)
            self.time_to_first_tokens_iter.append(first_token_latency)
            req_stats.first_token_latency = first_token_latency
            req_stats.first_token_ts = engine_core_timestamp
        else:
            self.inter_token_latencies_iter.append(
                max(0.0, engine_core_timestamp - req_stats.last_token_ts)
            )
        req_stats.num_generation_tokens += num_new_tokens
        req_stats.last_token_ts = engine_core_timestamp

    def update_from_finished_request(
        self,
        finish_reason: str,
        num_prompt_tokens: int,
        max_tokens_param: int | None,
        req_stats: RequestStateStats,
        num_cached_tokens: int = 0,
    ) -> FinishedRequestStats:
        """Record a finished (child) request: latencies split as vLLM splits them."""
        e2e_latency = self._time_since(req_stats.arrival_time)
        scheduled = req_stats.scheduled_ts
        first_token = req_stats.first_token_ts
        last_token = req_stats.last_token_ts
        # A request aborted in the queue was never scheduled: all of its life was queueing.
        queued_time = (scheduled - req_stats.arrival_time) if scheduled else e2e_latency
        prefill_time = (first_token - scheduled) if (scheduled and first_token) else 0.0
        decode_time = (last_token - first_token) if first_token else 0.0
        inference_time = (last_token - scheduled) if (scheduled and last_token) else 0.0
        num_generation_tokens = req_stats.num_generation_tokens
        mean_tpot = decode_time / (num_generation_tokens - 1) if num_generation_tokens > 1 else 0.0
        finished = FinishedRequestStats(
            finish_reason=finish_reason,
            e2e_latency=e2e_latency,
            num_prompt_tokens=num_prompt_tokens,
            num_generation_tokens=num_generation_tokens,
            max_tokens_param=max_tokens_param,
            queued_time=max(0.0, queued_time),
            prefill_time=max(0.0, prefill_time),
            inference_time=max(0.0, inference_time),
            decode_time=max(0.0, decode_time),
            mean_time_per_output_token=max(0.0, mean_tpot),
            num_cached_tokens=num_cached_tokens,
            num_preemptions=req_stats.num_preemptions,
        )
        self.finished_requests.append(finished)
        return finished

    def update_from_finished_parent(self, n: int, max_num_generation_tokens: int) -> None:
        """Record a finished user request (all n children done): n and its longest output."""
        self.n_params_iter.append(n)
        self.max_num_generation_tokens_iter.append(max_num_generation_tokens)

    @property
    def is_empty(self) -> bool:
        """Nothing happened to any request in this step."""
        return not (
            self.num_generation_tokens
            or self.num_prompt_tokens
            or self.finished_requests
            or self.n_params_iter
            or self.num_preempted_reqs
        )


@dataclass(slots=True)
class CachingMetrics:
    """Prefix-cache hit rate over the most recent queries (vLLM's sliding window).

    Fed with the scheduler's running totals; keeps per-update deltas until the window
    holds ``max_recent_queries`` tokens of queries.
    """

    max_recent_queries: int = 1 << 20
    _last_queries: int = 0
    _last_hits: int = 0
    _window: list[tuple[int, int]] = field(default_factory=list)
    _window_queries: int = 0
    _window_hits: int = 0

    def observe_totals(self, queries_total: int, hits_total: int) -> tuple[int, int]:
        """Take new running totals; returns the (queries, hits) added since the last call."""
        if queries_total < self._last_queries or hits_total < self._last_hits:
            # The totals were reset (e.g. the prefix cache was reset): start over.
            self._last_queries = self._last_hits = 0
        delta_queries = queries_total - self._last_queries
        delta_hits = hits_total - self._last_hits
        self._last_queries, self._last_hits = queries_total, hits_total
        if delta_queries > 0:
            self._window.append((delta_queries, delta_hits))
            self._window_queries += delta_queries
            self._window_hits += delta_hits
            while len(self._window) > 1 and self._window_queries - self._window[0][0] >= (
                self.max_recent_queries
            ):
                old_queries, old_hits = self._window.pop(0)
                self._window_queries -= old_queries
                self._window_hits -= old_hits
        return delta_queries, delta_hits

    @property
    def hit_rate(self) -> float:
        """Hits / queries (in tokens) over the window; 0.0 before any query."""
        return self._window_hits / self._window_queries if self._window_queries else 0.0


def running_total_delta(previous: int, current: int) -> int:
    """Increase of a running total since ``previous`` (a smaller value means it was reset)."""
    return current - previous if current >= previous else current
