"""IterationStats / RequestStateStats: what the output processor's hooks compute."""

from __future__ import annotations

import pytest

from pagedserve.engine.messages import EngineCoreOutput
from pagedserve.metrics.stats import (
    CachingMetrics,
    IterationStats,
    RequestStateStats,
    running_total_delta,
)


def _out(tokens: list[int], scheduled: float | None = None, preemptions: int = 0,
         finish: str | None = None) -> EngineCoreOutput:
    return EngineCoreOutput(request_id="r", new_token_ids=tokens, first_scheduled_time=scheduled,
                            num_preemptions=preemptions, finish_reason=finish)


def test_request_life_split_into_queue_prefill_decode() -> None:
    req = RequestStateStats(arrival_time=100.0)
    # A partial prefill chunk (prompt logprobs only): scheduled, no token yet.
    step0 = IterationStats(iteration_timestamp=100.6)
    step0.update_from_output(_out([], scheduled=100.5), 100.55, 7, req)
    assert step0.num_prompt_tokens == 0 and step0.time_to_first_tokens_iter == []
    assert req.scheduled_ts == 100.5 and req.is_prefilling

    step1 = IterationStats(iteration_timestamp=101.25)
    step1.update_from_output(_out([5], scheduled=100.5), 101.0, 7, req)
    assert step1.num_prompt_tokens == 7 and step1.num_generation_tokens == 1
    assert step1.time_to_first_tokens_iter == [pytest.approx(1.25)]
    assert step1.inter_token_latencies_iter == []

    step2 = IterationStats(iteration_timestamp=101.6)
    step2.update_from_output(_out([6]), 101.5, 7, req)
    step3 = IterationStats(iteration_timestamp=102.3)
    step3.update_from_output(_out([7], finish="length"), 102.0, 7, req)
    assert step2.num_prompt_tokens == 0 and step2.num_generation_tokens == 1
    assert step2.inter_token_latencies_iter == [pytest.approx(0.5)]
    assert step3.inter_token_latencies_iter == [pytest.approx(0.5)]
    finished = step3.update_from_finished_request("length", 7, 3, req, num_cached_tokens=4)
    step3.update_from_finished_parent(1, req.num_generation_tokens)
    assert finished.e2e_latency == pytest.approx(2.3)
    assert finished.queued_time == pytest.approx(0.5)
    assert finished.prefill_time == pytest.approx(0.5)
    assert finished.decode_time == pytest.approx(1.0)
    assert finished.inference_time == pytest.approx(1.5)
    assert finished.mean_time_per_output_token == pytest.approx(0.5)
    assert (finished.num_prompt_tokens, finished.num_generation_tokens) == (7, 3)
    assert finished.max_tokens_param == 3 and finished.num_cached_tokens == 4
    assert step3.n_params_iter == [1] and step3.max_num_generation_tokens_iter == [3]
    assert not step3.is_empty and IterationStats().is_empty


def test_aborted_in_queue_counts_as_queue_time() -> None:
    req = RequestStateStats(arrival_time=10.0)
    it = IterationStats(iteration_timestamp=12.0)
    it.update_from_output(_out([], finish="abort"), 12.0, 5, req)
    finished = it.update_from_finished_request("abort", 5, 16, req)
    assert finished.queued_time == pytest.approx(2.0)
    assert finished.prefill_time == finished.decode_time == finished.inference_time == 0.0
    assert finished.num_generation_tokens == 0 and finished.mean_time_per_output_token == 0.0
    assert it.num_prompt_tokens == 0  # never prefilled: no prompt tokens counted


def test_preemptions_counted_once_per_increase() -> None:
    req = RequestStateStats(arrival_time=0.0)
    it = IterationStats(iteration_timestamp=1.0)
    it.update_from_output(_out([1], scheduled=0.1, preemptions=0), 0.5, 3, req)
    it.update_from_output(_out([2], preemptions=2), 0.7, 3, req)
    it.update_from_output(_out([3], preemptions=2), 0.9, 3, req)
    assert it.num_preempted_reqs == 2 and req.num_preemptions == 2


def test_caching_metrics_window_and_reset() -> None:
    cm = CachingMetrics(max_recent_queries=100)
    assert cm.hit_rate == 0.0
    assert cm.observe_totals(50, 25) == (50, 25)
    assert cm.hit_rate == pytest.approx(0.5)
    assert cm.observe_totals(150, 25) == (100, 0)
    # The window keeps the newest >= 100 queried tokens: the first 50 fell out.
    assert cm.hit_rate == pytest.approx(0.0)
    assert cm.observe_totals(10, 10) == (10, 10)  # totals reset
    assert cm.hit_rate == pytest.approx(10 / 110)
    assert running_total_delta(5, 8) == 3 and running_total_delta(5, 2) == 2
