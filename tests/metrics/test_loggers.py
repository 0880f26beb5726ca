"""The periodic stats log line and the stat logger fan-out."""

from __future__ import annotations

import logging
import re
from types import SimpleNamespace

from pagedserve.engine.messages import SchedulerStats
from pagedserve.metrics.loggers import LoggingStatLogger, StatLoggerManager, format_stats_line
from pagedserve.metrics.prometheus import PrometheusStatLogger
from pagedserve.metrics.stats import IterationStats

LINE_RE = re.compile(
    r"^Avg prompt throughput: \d+\.\d tokens/s, Avg generation throughput: \d+\.\d tokens/s, "
    r"Running: \d+ reqs, Waiting: \d+ reqs, Preemptions: \d+, KV cache usage: \d+\.\d%, "
    r"Prefix cache hit rate: \d+\.\d%$"
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _iteration(prompt: int, generation: int) -> IterationStats:
    return IterationStats(num_prompt_tokens=prompt, num_generation_tokens=generation)


def test_format_matches_vllm_shape() -> None:
    line = format_stats_line(512.0, 96.25, 16, 3, 1, 0.4125, 0.125)
    assert line == (
        "Avg prompt throughput: 512.0 tokens/s, Avg generation throughput: 96.2 tokens/s, "
        "Running: 16 reqs, Waiting: 3 reqs, Preemptions: 1, KV cache usage: 41.2%, "
        "Prefix cache hit rate: 12.5%"
    )
    assert LINE_RE.match(line)


def test_logs_every_interval_while_busy() -> None:
    clock = FakeClock()
    lines: list[str] = []
    stat_logger = LoggingStatLogger(interval=5.0, clock=clock, log_fn=lines.append)
    stats = SchedulerStats(num_running_reqs=4, num_waiting_reqs=2, kv_cache_usage=0.5,
                           prefix_cache_queries=200, prefix_cache_hits=50, num_preemptions=1)
    for _ in range(4):  # 4 steps in the first 4 s: nothing logged yet
        stat_logger.record(stats, _iteration(100, 10))
        clock.now += 1.0
    assert lines == []
    clock.now += 1.0  # 5 s since start
    stat_logger.record(stats, _iteration(0, 10))
    assert lines == [
        "Avg prompt throughput: 80.0 tokens/s, Avg generation throughput: 10.0 tokens/s, "
        "Running: 4 reqs, Waiting: 2 reqs, Preemptions: 1, KV cache usage: 50.0%, "
        "Prefix cache hit rate: 25.0%"
    ]
    # Next interval: counts restart; preemptions are per interval.
    for preemptions in (1, 2, 2, 3, 3):
        clock.now += 1.0
        stat_logger.record(SchedulerStats(num_running_reqs=1, num_preemptions=preemptions,
                                          prefix_cache_queries=200, prefix_cache_hits=50),
                           _iteration(0, 5))
    assert len(lines) == 2
    assert lines[-1].startswith("Avg prompt throughput: 0.0 tokens/s, "
                                "Avg generation throughput: 5.0 tokens/s, Running: 1 reqs")
    assert "Preemptions: 2," in lines[-1]
    # 20 s idle (no steps, nothing logged), then busy again: the next line averages over
    # the busy seconds only, not the idle gap.
    clock.now += 20.0
    for _ in range(6):
        stat_logger.record(SchedulerStats(num_running_reqs=2), _iteration(0, 20))
        clock.now += 1.0
    assert len(lines) == 3
    assert "Avg generation throughput: 24.0 tokens/s, Running: 2 reqs" in lines[-1]
    # Drained: the last step reports nothing running; an explicit log() stays quiet.
    stat_logger.record(SchedulerStats(), None)
    clock.now += 5.0
    assert stat_logger.log() is None
    assert len(lines) == 3


def test_busy_lines_go_to_info(caplog) -> None:  # noqa: ANN001
    clock = FakeClock()
    stat_logger = LoggingStatLogger(interval=5.0, clock=clock)
    with caplog.at_level(logging.INFO, logger="pagedserve.metrics.loggers"):
        stat_logger.record(SchedulerStats(num_running_reqs=1), _iteration(10, 1))
        clock.now += 6.0
        stat_logger.record(SchedulerStats(num_running_reqs=1), _iteration(0, 1))
    records = [r for r in caplog.records if r.name == "pagedserve.metrics.loggers"]
    assert len(records) == 1 and records[0].levelno == logging.INFO
    assert LINE_RE.match(records[0].getMessage())


def test_manager_fans_out_and_disable_log_stats() -> None:
    engine_config = SimpleNamespace(
        model_config=SimpleNamespace(model="m", max_model_len=128,
                                     dtype="torch.float32"),
        cache_config=SimpleNamespace(block_size=16, enable_prefix_caching=False),
    )
    manager = StatLoggerManager.create(engine_config)
    kinds = [type(x) for x in manager.stat_loggers]
    assert kinds == [PrometheusStatLogger, LoggingStatLogger]
    manager.record(SchedulerStats(num_running_reqs=2), _iteration(5, 1))
    text = manager.prometheus.generate_latest().decode()
    assert 'pagedserve:prompt_tokens_total{engine="0",model_name="m"} 5.0' in text
    # cache_config_info waits for the engine core to size the KV cache.
    assert 'dtype="float32"' not in text
    manager.log_engine_initialized(9)
    manager.log_engine_initialized(12)  # set once
    text = manager.prometheus.generate_latest().decode()
    assert 'dtype="float32"' in text
    assert text.count("pagedserve:cache_config_info{") == 1
    assert 'num_blocks="9"' in text and 'num_gpu_blocks="9"' in text
    quiet = StatLoggerManager.create(engine_config, log_stats=False)
    assert [type(x) for x in quiet.stat_loggers] == [PrometheusStatLogger]


def test_step_budget_fields_are_appended_only_while_on() -> None:
    line = format_stats_line(512.0, 96.25, 16, 3, 1, 0.4125, 0.125, 412.4, 285)
    assert line.endswith("Prefix cache hit rate: 12.5%, Step budget: 412 ms, "
                         "Prefill budget: 285 tokens")
    assert LINE_RE.match(line.removesuffix(", Step budget: 412 ms, Prefill budget: 285 tokens"))
    assert format_stats_line(512.0, 96.25, 16, 3, 1, 0.4125, 0.125, 0.0, 0).endswith("12.5%")
    lines: list[str] = []
    clock = FakeClock()
    stat_logger = LoggingStatLogger(interval=5.0, clock=clock, log_fn=lines.append)
    stats = SchedulerStats(num_running_reqs=4, step_budget_ms=380.0, prefill_token_budget=96)
    stat_logger.record(stats, _iteration(100, 10))
    clock.now += 5.0
    stat_logger.record(stats, _iteration(0, 10))
    assert lines[-1].endswith(", Step budget: 380 ms, Prefill budget: 96 tokens")
