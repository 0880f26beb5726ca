"""Property test: block accounting survives any sequence of add / step / abort / failed step.

A small pool forces preemption. After every operation every block is either free
(ref 0, in the free queue exactly once) or owned (ref count == number of requests
holding it), the null block is never handed out, and every running request's
computed context reads back its own tokens. When everything has finished or been
aborted, all usable blocks are free again.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pagedserve.core.request import Request, RequestStatus

from .fakes import (
    EOS_TOKEN_ID,
    FakeModelRunner,
    check_block_accounting,
    default_next_token,
    make_request,
    make_scheduler,
)

MAX_MODEL_LEN = 24
# A few shared prefixes so requests hit each other's blocks.
PREFIXES = [list(range(100, 100 + MAX_MODEL_LEN)), list(range(200, 200 + MAX_MODEL_LEN)), []]


def next_token_with_eos(request: Request) -> int:
    token_id = default_next_token(request)
    return EOS_TOKEN_ID if token_id % 7 == 0 else token_id


add_op = st.tuples(
    st.just("add"),
    st.integers(0, len(PREFIXES) - 1),  # prefix
    st.integers(0, 16),  # prefix length used
    st.integers(0, 6),  # own suffix length
    st.integers(1, 8),  # max_tokens
    st.integers(0, 2),  # priority
    st.integers(1, 3),  # copies (n>1 siblings)
)
step_op = st.tuples(st.just("step"), st.integers(1, 3))
abort_op = st.tuples(st.just("abort"), st.integers(0, 50))
# The model call of a step fails: the engine fails every request of that step.
fail_op = st.tuples(st.just("fail"))
operations = st.lists(
    st.one_of(add_op, step_op, step_op, abort_op, fail_op), min_size=1, max_size=40
)

configs = st.fixed_dictionaries(
    {
        "block_size": st.sampled_from([1, 2, 4]),
        "extra_blocks": st.integers(0, 6),
        "max_num_batched_tokens": st.integers(1, 16),
        "max_num_seqs": st.integers(1, 4),
        "long_prefill_token_threshold": st.sampled_from([0, 0, 3, 5]),
        "policy": st.sampled_from(["fcfs", "priority"]),
        "enable_prefix_caching": st.sampled_from([True, True, False]),
    }
)


def check(scheduler, runner: FakeModelRunner) -> None:
    check_block_accounting(scheduler)
    runner.check_all_running()


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(config=configs, ops=operations, abort_at_end=st.booleans())
def test_block_accounting(config: dict, ops: list[tuple], abort_at_end: bool) -> None:
    block_size = config.pop("block_size")
    # Enough blocks for one request of max_model_len, plus a few: preemption happens
    # but progress is always possible.
    num_blocks = -(-MAX_MODEL_LEN // block_size) + 1 + config.pop("extra_blocks")
    scheduler = make_scheduler(
        num_blocks=num_blocks, block_size=block_size, max_model_len=MAX_MODEL_LEN, **config
    )
    runner = FakeModelRunner(scheduler, next_token_with_eos)
    request_ids: list[str] = []
    all_requests: list[Request] = []

    for op in ops:
        if op[0] == "add":
            _, prefix, prefix_len, suffix_len, max_tokens, priority, copies = op
            serial = len(request_ids)
            token_ids = PREFIXES[prefix][:prefix_len] + [500 + serial] * suffix_len
            if not token_ids:
                token_ids = [1]
            token_ids = token_ids[: MAX_MODEL_LEN - 1]
            for copy in range(copies):
                request = make_request(
                    f"r{serial}-{copy}",
                    token_ids,
                    max_tokens=max_tokens,
                    priority=priority,
                    eos_token_ids={EOS_TOKEN_ID},
                )
                scheduler.add_request(request)
                request_ids.append(request.request_id)
                all_requests.append(request)
        elif op[0] == "step":
            for _ in range(op[1]):
                runner.step()
                check(scheduler, runner)
        elif op[0] == "fail":
            scheduler_output = scheduler.schedule()
            failed = scheduler_output.scheduled_req_ids
            scheduler.finish_requests(failed, RequestStatus.FINISHED_ERROR)
        else:
            if request_ids:
                request_id = request_ids[op[1] % len(request_ids)]
                scheduler.finish_requests(request_id, RequestStatus.FINISHED_ABORTED)
        check(scheduler, runner)

    if abort_at_end:
        scheduler.finish_requests(list(request_ids), RequestStatus.FINISHED_ABORTED)
    else:
        for _ in range(2000):
            if not scheduler.has_unfinished_requests():
                break
            runner.step()
            check(scheduler, runner)
        assert not scheduler.has_unfinished_requests(), "no progress"
    check(scheduler, runner)

    pool = scheduler.kv_cache_manager.block_pool
    assert pool.get_num_free_blocks() == num_blocks - 1
    assert scheduler.kv_cache_usage == 0.0
    assert scheduler.requests == {} and scheduler.kv_cache_manager.req_to_blocks == {}
    for request in all_requests:
        assert request.is_finished()
        assert request.num_tokens <= MAX_MODEL_LEN
        if request.status not in (RequestStatus.FINISHED_ABORTED, RequestStatus.FINISHED_ERROR):
            assert 1 <= request.num_output_tokens <= request.max_tokens
    assert scheduler.schedule().is_empty
