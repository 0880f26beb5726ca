"""The scheduler, driven by a fake model runner (no model, exact expectations)."""

from __future__ import annotations

import pytest

from pagedserve.core.request import Request, RequestStatus
from pagedserve.core.sched_output import ModelRunnerOutput, SchedulerOutput

from .fakes import (
    EOS_TOKEN_ID,
    FakeModelRunner,
    check_block_accounting,
    default_next_token,
    make_request,
    make_scheduler,
)


def batch(scheduler_output: SchedulerOutput) -> list[tuple[str, int]]:
    return [
        (request_id, scheduler_output.num_scheduled_tokens[request_id])
        for request_id in scheduler_output.scheduled_req_ids
    ]


def tables(runner: FakeModelRunner, scheduler_output: SchedulerOutput) -> dict[str, list[int]]:
    """The block table rows of the step's requests, as the runner rebuilt them from the
    plain data (full lists for new requests, appended block ids for running ones)."""
    return {rid: runner.block_tables[rid] for rid in scheduler_output.scheduled_req_ids}


def new_block_ids(scheduler_output: SchedulerOutput) -> dict[str, list[int]]:
    cached = scheduler_output.scheduled_cached_reqs
    return dict(zip(cached.req_ids, cached.new_block_ids, strict=True))


def rid(requests) -> list[str]:
    return [request.request_id for request in requests]


def prompt(start: int, length: int) -> list[int]:
    return list(range(start, start + length))


# -- budget, chunking, caps --------------------------------------------------------


def test_chunked_prefill_exact_chunks() -> None:
    scheduler = make_scheduler(max_num_batched_tokens=8, enable_prefix_caching=False)
    runner = FakeModelRunner(scheduler)
    request = make_request("a", prompt(100, 20), max_tokens=3)
    scheduler.add_request(request)
    expected = [
        ([("a", 8)], (8, 20), []),
        ([("a", 8)], (16, 20), []),
        ([("a", 4)], (20, 21), ["a"]),  # the chunk reaches the end: a token is sampled
        ([("a", 1)], (21, 22), ["a"]),
        ([("a", 1)], (22, 23), ["a"]),  # third output token: finished
    ]
    for step, (expected_batch, expected_progress, expected_outputs) in enumerate(expected):
        scheduler_output, outputs = runner.step()
        assert batch(scheduler_output) == expected_batch
        assert scheduler_output.total_num_scheduled_tokens == expected_batch[0][1]
        assert scheduler_output.new_req_ids == ({"a"} if step == 0 else set())
        assert (request.num_computed_tokens, request.num_tokens) == expected_progress
        assert rid(outputs) == expected_outputs
        check_block_accounting(scheduler)
    assert request.status == RequestStatus.FINISHED_LENGTH_CAPPED
    assert request.num_output_tokens == 3
    assert request.num_cached_tokens == 0 and request.first_scheduled_time is not None
    assert not scheduler.has_unfinished_requests()
    assert scheduler.schedule().finished_req_ids == {"a"}


def test_budget_is_split_between_requests() -> None:
    scheduler = make_scheduler(max_num_batched_tokens=8)
    runner = FakeModelRunner(scheduler)
    a = make_request("a", prompt(100, 6))
    b = make_request("b", prompt(200, 10))
    scheduler.add_request(a)
    scheduler.add_request(b)

    scheduler_output, outputs = runner.step()
    assert batch(scheduler_output) == [("a", 6), ("b", 2)]
    assert scheduler_output.new_req_ids == {"a", "b"}
    assert rid(outputs) == ["a"]
    scheduler_output, outputs = runner.step()
    assert batch(scheduler_output) == [("a", 1), ("b", 7)]  # running first; b continues
    assert scheduler_output.new_req_ids == set() and rid(outputs) == ["a"]
    assert b.num_computed_tokens == 9 and b.num_output_tokens == 0
    scheduler_output, outputs = runner.step()
    assert batch(scheduler_output) == [("a", 1), ("b", 1)]
    assert rid(outputs) == ["a", "b"]
    assert (a.num_output_tokens, b.num_output_tokens) == (3, 1)


def test_max_num_seqs() -> None:
    scheduler = make_scheduler(max_num_seqs=2)
    runner = FakeModelRunner(scheduler)
    for name, start in (("a", 100), ("b", 200), ("c", 300)):
        scheduler.add_request(make_request(name, prompt(start, 4), max_tokens=2))
    scheduler_output, _ = runner.step()
    assert batch(scheduler_output) == [("a", 4), ("b", 4)]
    assert (scheduler.num_running, scheduler.num_waiting) == (2, 1)
    scheduler_output, outputs = runner.step()
    assert batch(scheduler_output) == [("a", 1), ("b", 1)]
    assert all(request.is_finished() for request in outputs)
    scheduler_output, _ = runner.step()
    assert batch(scheduler_output) == [("c", 4)]
    assert scheduler_output.finished_req_ids == {"a", "b"}


def test_long_prefill_threshold_lets_decodes_through() -> None:
    scheduler = make_scheduler(max_num_batched_tokens=10, long_prefill_token_threshold=4)
    runner = FakeModelRunner(scheduler)
    scheduler.add_request(make_request("a", prompt(100, 2)))
    scheduler.add_request(make_request("long", prompt(200, 12)))
    scheduler.add_request(make_request("c", prompt(300, 3)))
    expected = [
        [("a", 2), ("long", 4), ("c", 3)],
        [("a", 1), ("long", 4), ("c", 1)],
        [("a", 1), ("long", 4), ("c", 1)],
        [("a", 1), ("long", 1), ("c", 1)],
    ]
    for expected_batch in expected:
        scheduler_output, _ = runner.step()
        assert batch(scheduler_output) == expected_batch
    assert scheduler.get_request("long").num_output_tokens == 2


def test_waiting_request_gets_the_remaining_budget() -> None:
    scheduler = make_scheduler(max_num_batched_tokens=5)
    runner = FakeModelRunner(scheduler)
    scheduler.add_request(make_request("a", prompt(100, 3)))
    runner.step()
    scheduler.add_request(make_request("b", prompt(200, 9)))
    scheduler_output, _ = runner.step()
    assert batch(scheduler_output) == [("a", 1), ("b", 4)]
    scheduler_output, _ = runner.step()
    assert batch(scheduler_output) == [("a", 1), ("b", 4)]
    scheduler_output, outputs = runner.step()
    assert batch(scheduler_output) == [("a", 1), ("b", 1)]
    assert rid(outputs) == ["a", "b"]


# -- preemption ----------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["fcfs", "priority"])
def test_preemption_of_the_last_arrived(policy: str) -> None:
    """4 usable blocks of 4 tokens; two requests grow until one must go.

    With "priority" and equal priorities the latest arrival is the victim too.
    """
    scheduler = make_scheduler(num_blocks=5, max_model_len=16, policy=policy)
    runner = FakeModelRunner(scheduler)
    a = make_request("a", prompt(100, 4), max_tokens=8, arrival_time=1.0)
    b = make_request("b", prompt(200, 4), max_tokens=8, arrival_time=2.0)
    c = make_request("c", prompt(300, 4), max_tokens=8, arrival_time=3.0)
    scheduler.add_request(a)
    scheduler.add_request(b)
    scheduler_output, _ = runner.step()
    assert batch(scheduler_output) == [("a", 4), ("b", 4)]
    assert tables(runner, scheduler_output) == {"a": [1], "b": [2]}
    scheduler.add_request(c)
    scheduler_output, _ = runner.step()
    # c cannot get a block and waits.
    assert batch(scheduler_output) == [("a", 1), ("b", 1)]
    assert tables(runner, scheduler_output) == {"a": [1, 3], "b": [2, 4]}
    assert new_block_ids(scheduler_output) == {"a": [3], "b": [4]}  # only the new blocks
    for _ in range(3):
        scheduler_output, _ = runner.step()
        assert batch(scheduler_output) == [("a", 1), ("b", 1)]
    assert (a.num_tokens, b.num_tokens, scheduler.kv_cache_manager.num_free_blocks) == (9, 9, 0)

    # a needs a third block: b (last arrived) is preempted; c is not admitted.
    scheduler_output, _ = runner.step()
    assert batch(scheduler_output) == [("a", 1)]
    assert tables(runner, scheduler_output) == {"a": [1, 3, 4]}  # b's tail block, reused first
    assert new_block_ids(scheduler_output) == {"a": [4]}
    assert scheduler_output.new_req_ids == set()
    assert scheduler_output.preempted_req_ids == {"b"}
    assert b.status == RequestStatus.PREEMPTED and b.num_computed_tokens == 0
    assert b.num_preemptions == 1 and scheduler.num_preemptions == 1
    assert rid(scheduler.waiting) == ["b", "c"]
    assert scheduler.kv_cache_manager.num_free_blocks == 1
    check_block_accounting(scheduler)

    # b's first block is still cached, but b needs two more: nothing is admitted and
    # c does not skip ahead of b.
    for _ in range(2):
        scheduler_output, _ = runner.step()
        assert batch(scheduler_output) == [("a", 1)]
    assert a.status == RequestStatus.FINISHED_LENGTH_CAPPED
    scheduler_output, _ = runner.step()
    assert batch(scheduler_output) == [("b", 5), ("c", 4)]  # b resumes with a 4-token hit
    assert scheduler_output.new_req_ids == {"b", "c"}
    assert b.num_cached_tokens == 0  # counted when first scheduled

    runner.run_until_done()
    check_block_accounting(scheduler)
    assert scheduler.kv_cache_manager.num_free_blocks == 4
    assert all(r.status == RequestStatus.FINISHED_LENGTH_CAPPED for r in (a, b, c))
    # The resumed request produced the same tokens as without preemption.
    reference = make_scheduler(num_blocks=64, max_model_len=16, policy=policy)
    reference_b = make_request("b", prompt(200, 4), max_tokens=8)
    reference.add_request(reference_b)
    FakeModelRunner(reference).run_until_done()
    assert b.output_token_ids == reference_b.output_token_ids


def test_priority_preempts_an_already_scheduled_request() -> None:
    """x (priority 5) runs first in the batch; when y (priority 0) runs out of
    blocks, x is taken back out of this step's batch and preempted."""
    scheduler = make_scheduler(num_blocks=5, max_model_len=16, policy="priority")
    runner = FakeModelRunner(scheduler)
    x = make_request("x", prompt(100, 4), max_tokens=10, priority=5, arrival_time=1.0)
    y = make_request("y", prompt(200, 6), max_tokens=4, priority=0, arrival_time=2.0)
    scheduler.add_request(x)
    scheduler_output, _ = runner.step()
    assert batch(scheduler_output) == [("x", 4)]
    scheduler.add_request(y)
    scheduler_output, _ = runner.step()
    assert batch(scheduler_output) == [("x", 1), ("y", 6)]
    assert tables(runner, scheduler_output) == {"x": [1, 2], "y": [3, 4]}
    for _ in range(2):
        scheduler_output, _ = runner.step()
        assert batch(scheduler_output) == [("x", 1), ("y", 1)]

    # x's allocation registered its second block (full after this step) before y failed.
    scheduler_output, outputs = runner.step()
    assert batch(scheduler_output) == [("y", 1)]
    assert scheduler_output.total_num_scheduled_tokens == 1
    assert tables(runner, scheduler_output) == {"y": [3, 4, 2]}
    # x was taken back out of the batch: only y is left in it.
    assert new_block_ids(scheduler_output) == {"y": [2]}
    assert x.status == RequestStatus.PREEMPTED and x.num_computed_tokens == 0
    assert scheduler.num_preemptions == 1
    # x never computed its second block: it must not be hit-able.
    pool = scheduler.kv_cache_manager.block_pool
    assert pool.get_cached_block(x.block_hashes[1]) is None
    assert pool.get_cached_block(x.block_hashes[0]) is pool.blocks[1]
    assert y.status == RequestStatus.FINISHED_LENGTH_CAPPED and rid(outputs) == ["y"]

    scheduler_output, _ = runner.step()
    assert batch(scheduler_output) == [("x", 4)]  # resumes after a 4-token hit
    assert scheduler_output.new_req_ids == {"x"}
    runner.run_until_done()
    assert x.num_output_tokens == 10
    check_block_accounting(scheduler)


def test_blocks_registered_by_a_preempted_chunk_are_not_hit() -> None:
    """x registers two blocks for its chunk, then is preempted in the same step
    before computing them: those blocks must leave the prefix cache, or z (same
    prompt) would read K/V that was never written."""
    scheduler = make_scheduler(
        num_blocks=8,
        block_size=2,
        max_num_batched_tokens=6,
        long_prefill_token_threshold=4,
        max_model_len=14,
        policy="priority",
    )
    runner = FakeModelRunner(scheduler)
    x = make_request("x", prompt(100, 12), max_tokens=2, priority=5, arrival_time=1.0)
    y = make_request("y", prompt(200, 2), max_tokens=3, priority=0, arrival_time=2.0)
    scheduler.add_request(x)
    scheduler_output, _ = runner.step()
    assert batch(scheduler_output) == [("x", 4)]
    scheduler.add_request(y)
    scheduler_output, _ = runner.step()
    assert batch(scheduler_output) == [("x", 4), ("y", 2)]
    assert tables(runner, scheduler_output) == {"x": [1, 2, 3, 4], "y": [5]}
    scheduler_output, _ = runner.step()
    assert batch(scheduler_output) == [("y", 1)]
    assert scheduler_output.preempted_req_ids == {"x"}
    pool = scheduler.kv_cache_manager.block_pool
    assert pool.get_cached_block(x.block_hashes[4]) is None
    assert pool.get_cached_block(x.block_hashes[5]) is None
    assert pool.get_cached_block(x.block_hashes[3]) is pool.blocks[4]

    z = make_request("z", prompt(100, 12) + [7], max_tokens=1, arrival_time=3.0)
    scheduler.add_request(z)
    while scheduler.has_unfinished_requests():
        runner.step()
        runner.check_all_running()
        check_block_accounting(scheduler)
    assert z.num_cached_tokens == 8
    assert x.num_output_tokens == 2 and z.num_output_tokens == 1


def test_self_preemption_lets_later_requests_run() -> None:
    """With the priority policy the request that runs out of blocks may be its own
    victim; the running requests after it are still scheduled."""
    scheduler = make_scheduler(num_blocks=3, max_model_len=8, policy="priority")
    runner = FakeModelRunner(scheduler)
    low = make_request("low", prompt(100, 3), max_tokens=5, priority=9, arrival_time=1.0)
    high = make_request("high", prompt(200, 4), max_tokens=4, priority=0, arrival_time=2.0)
    scheduler.add_request(low)
    runner.step()
    scheduler.add_request(high)
    scheduler_output, _ = runner.step()
    assert batch(scheduler_output) == [("low", 1), ("high", 4)]
    assert tables(runner, scheduler_output) == {"low": [1], "high": [2]}
    # low needs a second block, none is free, and low is its own victim; high
    # then gets low's block.
    scheduler_output, _ = runner.step()
    assert batch(scheduler_output) == [("high", 1)]
    assert tables(runner, scheduler_output) == {"high": [2, 1]}
    assert scheduler_output.preempted_req_ids == {"low"}
    assert low.status == RequestStatus.PREEMPTED
    runner.run_until_done()
    assert low.num_output_tokens == 5 and high.num_output_tokens == 4
    check_block_accounting(scheduler)


def test_priority_admission_order() -> None:
    scheduler = make_scheduler(max_num_seqs=1, policy="priority")
    runner = FakeModelRunner(scheduler)
    for name, priority, arrival in (("p2", 2, 1.0), ("p0", 0, 2.0), ("p1", 1, 3.0), ("p0b", 0, 4.0)):
        scheduler.add_request(
            make_request(name, prompt(100, 4), max_tokens=1, priority=priority, arrival_time=arrival)
        )
    order = []
    while scheduler.has_unfinished_requests():
        scheduler_output, _ = runner.step()
        order.extend(scheduler_output.scheduled_req_ids)
    assert order == ["p0", "p0b", "p1", "p2"]


# -- aborts --------------------------------------------------------------------------


def test_abort_waiting_and_running_requests() -> None:
    scheduler = make_scheduler(num_blocks=10, max_num_seqs=1)
    runner = FakeModelRunner(scheduler)
    scheduler.add_request(make_request("running", prompt(100, 9)))
    scheduler.add_request(make_request("waiting", prompt(200, 5)))
    runner.step()
    assert scheduler.num_running == 1 and scheduler.num_waiting == 1
    assert scheduler.kv_cache_usage == pytest.approx(3 / 9)
    finished = scheduler.finish_requests(
        ["running", "waiting", "unknown"], RequestStatus.FINISHED_ABORTED
    )
    assert rid(finished) == ["running", "waiting"]
    assert all(r.status == RequestStatus.FINISHED_ABORTED for r in finished)
    assert scheduler.kv_cache_usage == 0.0 and scheduler.kv_cache_manager.num_free_blocks == 9
    assert not scheduler.has_unfinished_requests()
    assert scheduler.get_num_unfinished_requests() == 0
    assert scheduler.get_request("running") is None
    check_block_accounting(scheduler)
    scheduler_output = scheduler.schedule()
    assert scheduler_output.is_empty
    assert scheduler_output.finished_req_ids == {"running", "waiting"}
    # Aborting again is harmless; a FINISHED_* status is required.
    assert scheduler.finish_requests("running", RequestStatus.FINISHED_ABORTED) == []
    with pytest.raises(ValueError):
        scheduler.finish_requests("x", RequestStatus.RUNNING)


def test_abort_during_a_step_is_ignored_by_update() -> None:
    scheduler = make_scheduler()
    runner = FakeModelRunner(scheduler)
    scheduler.add_request(make_request("a", prompt(100, 4)))
    scheduler.add_request(make_request("b", prompt(200, 4)))
    scheduler_output = scheduler.schedule()
    runner_output = runner.execute_model(scheduler_output)
    scheduler.finish_requests("a", RequestStatus.FINISHED_ABORTED)
    outputs = scheduler.update_from_output(scheduler_output, runner_output)
    assert rid(outputs) == ["b"]
    check_block_accounting(scheduler)


def test_failed_step_leaves_no_stale_prefix_blocks() -> None:
    """The engine fails every request of a step whose model call raised; blocks
    registered for that step were never written and must not be hit later."""
    scheduler = make_scheduler()
    runner = FakeModelRunner(scheduler)
    for name in ("a", "b"):  # siblings: b shares a's blocks within the step
        scheduler.add_request(make_request(name, prompt(100, 10)))
    scheduler_output = scheduler.schedule()
    assert batch(scheduler_output) == [("a", 10), ("b", 2)]
    scheduler.finish_requests(["a", "b"], RequestStatus.FINISHED_ERROR)
    check_block_accounting(scheduler)
    assert scheduler.kv_cache_manager.block_pool.cached_block_hash_to_block == {}
    retry = make_request("c", prompt(100, 10))
    scheduler.add_request(retry)
    runner.run_until_done()
    assert retry.num_cached_tokens == 0 and retry.num_output_tokens == 16


def test_abort_preempted_request() -> None:
    scheduler = make_scheduler(num_blocks=5, max_model_len=16)
    runner = FakeModelRunner(scheduler)
    scheduler.add_request(make_request("a", prompt(100, 8), max_tokens=8))
    scheduler.add_request(make_request("b", prompt(200, 8), max_tokens=8))
    while scheduler.num_preemptions == 0:
        runner.step()
    victim = scheduler.waiting.peek_request()
    assert victim.status == RequestStatus.PREEMPTED
    scheduler.finish_requests(victim.request_id, RequestStatus.FINISHED_ABORTED)
    assert scheduler.num_waiting == 0
    check_block_accounting(scheduler)
    runner.run_until_done()
    assert scheduler.kv_cache_manager.num_free_blocks == 4


# -- stop conditions -----------------------------------------------------------------


def run_one(request: Request, next_token=default_next_token, **scheduler_kwargs) -> Request:
    scheduler = make_scheduler(**scheduler_kwargs)
    runner = FakeModelRunner(scheduler, next_token)
    scheduler.add_request(request)
    runner.run_until_done()
    assert scheduler.kv_cache_manager.num_free_blocks == scheduler.kv_cache_config.num_blocks - 1
    return request


def always(token_id: int):
    return lambda request: token_id


def test_stop_on_eos() -> None:
    request = run_one(
        make_request("a", prompt(100, 5), eos_token_ids={EOS_TOKEN_ID}), always(EOS_TOKEN_ID)
    )
    assert request.status == RequestStatus.FINISHED_STOPPED
    assert request.output_token_ids == [EOS_TOKEN_ID] and request.stop_reason is None
    assert request.get_finished_reason() == "stop"


def test_stop_token_ids_give_a_stop_reason() -> None:
    def next_token(request: Request) -> int:
        return 7 if request.num_output_tokens == 2 else 50

    request = run_one(
        make_request("a", prompt(100, 5), stop_token_ids=[7], eos_token_ids={EOS_TOKEN_ID}),
        next_token,
    )
    assert request.status == RequestStatus.FINISHED_STOPPED
    assert request.output_token_ids == [50, 50, 7] and request.stop_reason == 7


def test_min_tokens_defers_stop_tokens() -> None:
    request = run_one(
        make_request("a", prompt(100, 5), min_tokens=3, eos_token_ids={EOS_TOKEN_ID}),
        always(EOS_TOKEN_ID),
    )
    assert request.status == RequestStatus.FINISHED_STOPPED
    assert request.output_token_ids == [EOS_TOKEN_ID] * 3
    request = run_one(
        make_request("b", prompt(100, 5), min_tokens=2, stop_token_ids=[7]), always(7)
    )
    assert request.output_token_ids == [7, 7] and request.stop_reason == 7


def test_max_tokens() -> None:
    request = run_one(make_request("a", prompt(100, 5), max_tokens=5))
    assert request.status == RequestStatus.FINISHED_LENGTH_CAPPED
    assert request.num_output_tokens == 5 and request.stop_reason is None
    assert request.get_finished_reason() == "length"


def test_ignore_eos() -> None:
    request = run_one(
        make_request(
            "a", prompt(100, 5), max_tokens=4, ignore_eos=True, eos_token_ids={EOS_TOKEN_ID}
        ),
        always(EOS_TOKEN_ID),
    )
    assert request.status == RequestStatus.FINISHED_LENGTH_CAPPED
    assert request.output_token_ids == [EOS_TOKEN_ID] * 4
    # stop_token_ids still apply with ignore_eos.
    request = run_one(
        make_request("b", prompt(100, 5), ignore_eos=True, stop_token_ids=[EOS_TOKEN_ID]),
        always(EOS_TOKEN_ID),
    )
    assert request.status == RequestStatus.FINISHED_STOPPED
    assert request.stop_reason == EOS_TOKEN_ID


def test_max_model_len_caps_generation() -> None:
    request = run_one(make_request("a", prompt(100, 8), max_tokens=100), max_model_len=10)
    assert request.status == RequestStatus.FINISHED_LENGTH_CAPPED
    assert request.num_tokens == 10 and request.num_output_tokens == 2


def test_stop_token_wins_over_length_on_the_same_step() -> None:
    request = run_one(make_request("a", prompt(100, 5), max_tokens=1, stop_token_ids=[7]), always(7))
    assert request.status == RequestStatus.FINISHED_STOPPED and request.stop_reason == 7


# -- prefix caching through the scheduler ------------------------------------------


def test_prefix_hit_sets_num_cached_tokens_and_stats() -> None:
    scheduler = make_scheduler()
    runner = FakeModelRunner(scheduler)
    first = make_request("a", prompt(100, 10), max_tokens=2)
    scheduler.add_request(first)
    runner.run_until_done()
    second = make_request("b", prompt(100, 10) + [7, 7, 7], max_tokens=2)
    scheduler.add_request(second)
    scheduler_output, _ = runner.step()
    assert batch(scheduler_output) == [("b", 5)]
    assert second.num_cached_tokens == 8
    stats = scheduler.prefix_cache_stats
    assert (stats.requests, stats.queries, stats.hits) == (2, 23, 8)
    assert scheduler.make_prefix_cache_stats().hits == 8
    assert scheduler.make_prefix_cache_stats().hits == 0
    runner.run_until_done()


def test_siblings_admitted_together_share_blocks() -> None:
    scheduler = make_scheduler()
    runner = FakeModelRunner(scheduler)
    siblings = [make_request(f"s{i}", prompt(100, 10), max_tokens=3) for i in range(3)]
    for request in siblings:
        scheduler.add_request(request)
    scheduler_output, _ = runner.step()
    assert batch(scheduler_output) == [("s0", 10), ("s1", 2), ("s2", 2)]
    rows = [scheduler_output.scheduled_new_reqs[i].block_ids for i in range(3)]
    assert rows[0][:2] == rows[1][:2] == rows[2][:2]
    assert len({row[2] for row in rows}) == 3  # the partial block is private
    assert [r.num_cached_tokens for r in siblings] == [0, 8, 8]
    check_block_accounting(scheduler)
    runner.run_until_done()


def test_no_prefix_hits_with_prompt_logprobs() -> None:
    scheduler = make_scheduler()
    runner = FakeModelRunner(scheduler)
    scheduler.add_request(make_request("a", prompt(100, 10), max_tokens=1))
    runner.run_until_done()
    request = make_request("b", prompt(100, 10), max_tokens=1, prompt_logprobs=0)
    scheduler.add_request(request)
    scheduler_output, _ = runner.step()
    assert batch(scheduler_output) == [("b", 10)] and request.num_cached_tokens == 0


# -- misc ----------------------------------------------------------------------------


def test_add_request_validation() -> None:
    scheduler = make_scheduler(max_model_len=8)
    scheduler.add_request(make_request("a", prompt(100, 4)))
    with pytest.raises(ValueError, match="already in use"):
        scheduler.add_request(make_request("a", prompt(100, 4)))
    with pytest.raises(ValueError, match="max_model_len"):
        scheduler.add_request(make_request("b", prompt(100, 9)))
    with pytest.raises(ValueError, match="empty"):
        scheduler.add_request(make_request("c", []))
    assert scheduler.get_request("a") is not None and scheduler.num_waiting == 1


def test_empty_step() -> None:
    scheduler = make_scheduler()
    scheduler_output = scheduler.schedule()
    assert scheduler_output.is_empty and scheduler_output.scheduled_req_ids == []
    assert scheduler.update_from_output(scheduler_output, ModelRunnerOutput({})) == []


def test_preemption_does_not_change_outputs() -> None:
    """A workload on a tiny pool (many preemptions) yields the same tokens as on a
    big one, and the fake runner's KV checks pass throughout."""

    def run(num_blocks: int) -> tuple[dict[str, list[int]], int]:
        scheduler = make_scheduler(
            num_blocks=num_blocks, max_num_batched_tokens=16, max_model_len=32, max_num_seqs=8
        )
        runner = FakeModelRunner(scheduler)
        requests = [
            make_request(f"r{i}", prompt(100 + 3 * (i % 3), 5 + 3 * i), max_tokens=6 + i)
            for i in range(8)
        ]
        for request in requests:
            scheduler.add_request(request)
        while scheduler.has_unfinished_requests():
            runner.step()
            runner.check_all_running()
            check_block_accounting(scheduler)
        return {r.request_id: r.output_token_ids for r in requests}, scheduler.num_preemptions

    small, num_preemptions = run(num_blocks=12)
    big, no_preemptions = run(num_blocks=200)
    assert num_preemptions > 0 and no_preemptions == 0
    assert small == big
