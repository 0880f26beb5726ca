"""FCFS and priority waiting queues."""

from __future__ import annotations

import pytest

from pagedserve.core.request_queue import (
    FCFSRequestQueue,
    PriorityRequestQueue,
    create_request_queue,
)

from .fakes import make_request


def rid(requests) -> list[str]:
    return [request.request_id for request in requests]


def test_create_request_queue() -> None:
    assert isinstance(create_request_queue("fcfs"), FCFSRequestQueue)
    assert isinstance(create_request_queue("priority"), PriorityRequestQueue)
    with pytest.raises(ValueError, match="policy"):
        create_request_queue("lifo")


def test_fcfs_queue() -> None:
    queue = create_request_queue("fcfs")
    assert not queue and len(queue) == 0
    a, b, c, d = (make_request(x, [1], arrival_time=i) for i, x in enumerate("abcd"))
    for request in (a, b, c):
        queue.add_request(request)
    assert rid(queue) == ["a", "b", "c"] and queue.peek_request() is a
    assert queue.pop_request() is a
    queue.prepend_request(a)
    assert rid(queue) == ["a", "b", "c"]
    queue.add_request(d)
    queue.remove_request(b)
    assert rid(queue) == ["a", "c", "d"]
    queue.remove_requests([a, d, b])
    assert rid(queue) == ["c"] and len(queue) == 1
    with pytest.raises(ValueError):
        queue.remove_request(a)
    queue.pop_request()
    with pytest.raises(IndexError):
        queue.pop_request()
    with pytest.raises(IndexError):
        queue.peek_request()


def test_priority_queue_order() -> None:
    queue = create_request_queue("priority")
    requests = [
        make_request("low-early", [1], priority=5, arrival_time=1.0),
        make_request("high-late", [1], priority=0, arrival_time=3.0),
        make_request("high-early", [1], priority=0, arrival_time=2.0),
        make_request("negative", [1], priority=-1, arrival_time=4.0),
        make_request("low-late", [1], priority=5, arrival_time=5.0),
    ]
    for request in requests:
        queue.add_request(request)
    expected = ["negative", "high-early", "high-late", "low-early", "low-late"]
    assert rid(queue) == expected
    assert queue.peek_request().request_id == "negative"
    assert [queue.pop_request().request_id for _ in range(5)] == expected
    with pytest.raises(IndexError):
        queue.pop_request()


def test_priority_queue_equal_keys_keep_insertion_order() -> None:
    queue = create_request_queue("priority")
    for name in "abc":
        queue.add_request(make_request(name, [1], arrival_time=1.0))
    assert rid(queue) == ["a", "b", "c"]


def test_priority_queue_prepend_and_remove() -> None:
    queue = create_request_queue("priority")
    early = make_request("early", [1], priority=1, arrival_time=1.0)
    late = make_request("late", [1], priority=1, arrival_time=2.0)
    urgent = make_request("urgent", [1], priority=0, arrival_time=3.0)
    queue.add_request(late)
    queue.add_request(urgent)
    # A preempted request goes back into the heap at its own place.
    queue.prepend_request(early)
    assert rid(queue) == ["urgent", "early", "late"]
    queue.remove_request(urgent)
    assert queue.peek_request() is early
    with pytest.raises(ValueError):
        queue.remove_request(urgent)
    queue.remove_requests([late])
    assert rid(queue) == ["early"]
    queue.remove_request(early)
    assert not queue
