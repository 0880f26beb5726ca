"""The periodic stats log line and the fan-out of stats to every stat logger.

``LoggingStatLogger`` writes one line like vLLM's every ``interval`` seconds while the
engine is busy::

    Avg prompt throughput: 512.0 tokens/s, Avg generation throughput: 96.3 tokens/s,
    Running: 16 reqs, Waiting: 3 reqs, Preemptions: 0, KV cache usage: 41.2%,
    Prefix cache hit rate: 12.5%, Step budget: 412 ms, Prefill budget: 285 tokens

(one line; "KV cache" rather than vLLM's "GPU KV cache": the engine is device-agnostic).
The last two fields, only while the step-time budget is on, are the last step's target
and the tokens its prefill chunks could take (``--max-step-latency-ms``).
``StatLoggerManager`` is what the front end calls once per engine-core step.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from pagedserve.metrics.stats import CachingMetrics, IterationStats, running_total_delta

logger = logging.getLogger(__name__)

DEFAULT_LOG_INTERVAL_S = 5.0


class StatLoggerBase(Protocol):
    """What the manager calls on each logger."""

    def record(self, scheduler_stats: Any | None, iteration_stats: IterationStats | None) -> None:
        ...

    def log(self) -> None:
        ...

    def log_engine_initialized(self, num_blocks: int | None = None) -> None:
        ...


def format_stats_line(
    prompt_throughput: float,
    generation_throughput: float,
    num_running: int,
    num_waiting: int,
    num_preemptions: int,
    kv_cache_usage: float,
    prefix_cache_hit_rate: float,
    step_budget_ms: float = 0.0,
    prefill_token_budget: int = 0,
) -> str:
    """The stats line (throughputs in tokens/s; usage and hit rate as fractions; the step
    budget's fields only when ``step_budget_ms`` > 0)."""
    line = (
        f"Avg prompt throughput: {prompt_throughput:.1f} tokens/s, "
        f"Avg generation throughput: {generation_throughput:.1f} tokens/s, "
        f"Running: {num_running} reqs, Waiting: {num_waiting} reqs, "
        f"Preemptions: {num_preemptions}, "
        f"KV cache usage: {kv_cache_usage * 100:.1f}%, "
        f"Prefix cache hit rate: {prefix_cache_hit_rate * 100:.1f}%"
    )
    if step_budget_ms > 0:
        line += (
            f", Step budget: {step_budget_ms:.0f} ms, "
            f"Prefill budget: {prefill_token_budget} tokens"
        )
    return line


class LoggingStatLogger:
    """Logs throughput and engine state every ``interval`` seconds while busy.

    Throughputs are averaged over the interval. ``Preemptions`` counts those of the
    interval. The prefix-cache hit rate is over recent queries (vLLM's sliding window).
    A window starts at the first step after start-up or after an idle gap (no step for
    ``interval`` seconds), so the averages cover busy time. Idle windows (no tokens,
    nothing running or waiting) log at DEBUG, busy ones at INFO.
    """

    def __init__(
        self,
        interval: float = DEFAULT_LOG_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
        log_fn: Callable[[str], None] | None = None,
    ) -> None:
        self.interval = interval
        self.clock = clock
        self.log_fn = log_fn
        self.last_log_time = clock()
        self.num_prompt_tokens = 0
        self.num_generation_tokens = 0
        self.num_preemptions = 0
        self._last_preemptions_total = 0
        self.last_scheduler_stats: Any | None = None
        self.prefix_caching = CachingMetrics()
        self._last_record_time: float | None = None
        self.last_line: str | None = None

    def record(self, scheduler_stats: Any | None, iteration_stats: IterationStats | None) -> None:
        now = self.clock()
        if self._last_record_time is None or now - self._last_record_time >= self.interval:
            # First step after start-up or an idle gap: close the old window at its last
            # activity, so averages cover busy time, not the idle time before this step.
            if self._last_record_time is not None and (
                self.num_prompt_tokens or self.num_generation_tokens
            ):
                self.log(now=self._last_record_time)
            self._reset_window(now)
        self._last_record_time = now
        if iteration_stats is not None:
            self.num_prompt_tokens += iteration_stats.num_prompt_tokens
            self.num_generation_tokens += iteration_stats.num_generation_tokens
        if scheduler_stats is not None:
            self.last_scheduler_stats = scheduler_stats
            self.prefix_caching.observe_totals(
                scheduler_stats.prefix_cache_queries, scheduler_stats.prefix_cache_hits)
            self.num_preemptions += running_total_delta(
                self._last_preemptions_total, scheduler_stats.num_preemptions)
            self._last_preemptions_total = scheduler_stats.num_preemptions
        if now - self.last_log_time >= self.interval:
            self.log(now=now)

    def _reset_window(self, now: float) -> None:
        self.num_prompt_tokens = self.num_generation_tokens = self.num_preemptions = 0
        self.last_log_time = now

    def log(self, now: float | None = None) -> str | None:
        """Write the line for the window that just ended; returns it (None if idle)."""
        now = self.clock() if now is None else now
        elapsed = max(now - self.last_log_time, 1e-9)
        prompt_throughput = self.num_prompt_tokens / elapsed
        generation_throughput = self.num_generation_tokens / elapsed
        stats = self.last_scheduler_stats
        num_running = stats.num_running_reqs if stats is not None else 0
        num_waiting = stats.num_waiting_reqs if stats is not None else 0
        kv_usage = stats.kv_cache_usage if stats is not None else 0.0
        line = format_stats_line(
            prompt_throughput, generation_throughput, num_running, num_waiting,
            self.num_preemptions, kv_usage, self.prefix_caching.hit_rate,
            getattr(stats, "step_budget_ms", 0.0), getattr(stats, "prefill_token_budget", 0),
        )
        busy = bool(prompt_throughput or generation_throughput or num_running or num_waiting)
        self._reset_window(now)
        if self.log_fn is not None:
            if busy:
                self.log_fn(line)
        elif busy:
            logger.info(line)
        else:
            logger.debug(line)
        self.last_line = line if busy else None
        return self.last_line

    def log_engine_initialized(self, num_blocks: int | None = None) -> None:
        """Nothing to say at start-up: the server's banner already did."""


class StatLoggerManager:
    """Fans each step's stats out to the stat loggers (Prometheus, the log line, ...)."""

    def __init__(self, stat_loggers: Sequence[StatLoggerBase]) -> None:
        self.stat_loggers = list(stat_loggers)

    @classmethod
    def create(
        cls,
        engine_config: Any,
        model_name: str | None = None,
        log_stats: bool = True,
        metrics_compat: str | None = None,
        registry: Any | None = None,
        enable_prometheus: bool = True,
        log_interval: float = DEFAULT_LOG_INTERVAL_S,
    ) -> StatLoggerManager:
        """The standard loggers: Prometheus (for /metrics) and, unless disabled, the log line."""
        from pagedserve.metrics.prometheus import MetricsInfo, PrometheusStatLogger

        loggers: list[StatLoggerBase] = []
        if enable_prometheus:
            info = MetricsInfo.from_engine_config(engine_config, model_name)
            loggers.append(PrometheusStatLogger(info, registry, metrics_compat))
        if log_stats:
            loggers.append(LoggingStatLogger(log_interval))
        return cls(loggers)

    @property
    def prometheus(self) -> Any | None:
        """The Prometheus logger (its ``registry`` is what /metrics exposes), if any."""
        from pagedserve.metrics.prometheus import PrometheusStatLogger

        for stat_logger in self.stat_loggers:
            if isinstance(stat_logger, PrometheusStatLogger):
                return stat_logger
        return None

    def record(self, scheduler_stats: Any | None, iteration_stats: IterationStats | None) -> None:
        for stat_logger in self.stat_loggers:
            stat_logger.record(scheduler_stats, iteration_stats)

    def log(self) -> None:
        for stat_logger in self.stat_loggers:
            stat_logger.log()

    def log_engine_initialized(self, num_blocks: int | None = None) -> None:
        """The engine core is ready; ``num_blocks`` is its KV cache's size in blocks."""
        for stat_logger in self.stat_loggers:
            stat_logger.log_engine_initialized(num_blocks)
