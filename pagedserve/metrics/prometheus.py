"""Prometheus metrics under the ``pagedserve:`` prefix, with vLLM's names and semantics.

Every engine owns a ``CollectorRegistry`` (never the process-global one), so tests and
several engines in one process never collide. ``--metrics-compat vllm`` adds a collector
that re-exposes every metric under its ``vllm:`` name at scrape time (no cost per
observation), plus vLLM's deprecated aliases that older dashboards still query
(``vllm:gpu_cache_usage_perc``, ``vllm:gpu_prefix_cache_*``,
``vllm:time_per_output_token_seconds``) and the HTTP metrics of
prometheus-fastapi-instrumentator that vLLM's server exports.

Types, buckets and documentation follow vLLM v1 (``vllm/v1/metrics/loggers.py``).
Counters are exposed with the ``_total`` suffix (``pagedserve:prompt_tokens_total``).
``kv_cache_usage_perc`` is a fraction in [0, 1], as in vLLM.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.samples import Sample

from pagedserve.metrics.stats import FINISH_REASONS, IterationStats, running_total_delta

PREFIX = "pagedserve:"
COMPAT_CHOICES = ("none", "vllm")

TTFT_BUCKETS = [
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
    10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
]
ITL_BUCKETS = [
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0,
]
REQUEST_LATENCY_BUCKETS = [
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
    240.0, 480.0, 960.0, 1920.0, 7680.0,
]
ITERATION_TOKENS_BUCKETS = [1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384]
PARAMS_N_BUCKETS = [1, 2, 5, 10, 20]
# prometheus-fastapi-instrumentator's "highr" latency buckets.
HTTP_DURATION_BUCKETS = [
    0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5,
    5.0, 7.5, 10.0, 30.0, 60.0,
]
HTTP_DURATION_LOWR_BUCKETS = [0.1, 0.5, 1.0]

# vLLM's deprecated names that dashboards of older releases still query.
VLLM_ALIASES = {
    "kv_cache_usage_perc": ("gpu_cache_usage_perc",),
    "prefix_cache_queries": ("gpu_prefix_cache_queries",),
    "prefix_cache_hits": ("gpu_prefix_cache_hits",),
    "inter_token_latency_seconds": ("time_per_output_token_seconds",),
}


def build_buckets(mantissa_lst: list[int], max_value: int) -> list[int]:
    """[1, 2, 5, 10, 20, 50, ...] (for mantissas 1, 2, 5) up to ``max_value``, as vLLM."""
    exponent = 0
    buckets: list[int] = []
    while True:
        for m in mantissa_lst:
            value = m * 10**exponent
            if value <= max_value:
                buckets.append(value)
            else:
                return buckets
        exponent += 1


def build_1_2_5_buckets(max_value: int) -> list[int]:
    return build_buckets([1, 2, 5], max_value)


@dataclass(frozen=True)
class MetricsInfo:
    """What the collectors need to know about the engine (labels, bucket ranges)."""

    model_name: str
    max_model_len: int = 32768
    block_size: int = 16
    num_blocks: int = 0  # 0: not known yet (the engine core sizes the KV cache)
    enable_prefix_caching: bool = True
    dtype: str = "auto"
    engine_index: int = 0

    @classmethod
    def from_engine_config(cls, engine_config: Any, model_name: str | None = None) -> MetricsInfo:
        model = engine_config.model_config
        cache = engine_config.cache_config
        name = model_name or model.model
        return cls(
            model_name=str(name),
            max_model_len=int(model.max_model_len),
            block_size=int(cache.block_size),
            enable_prefix_caching=bool(cache.enable_prefix_caching),
            dtype=str(model.dtype).removeprefix("torch."),
        )


class _RenamedCollector:
    """Re-exposes other collectors' families under new names at scrape time."""

    def __init__(self, sources: list[tuple[Any, str, str]]) -> None:
        # (collector, its family name, the new family name)
        self.sources = sources

    def collect(self) -> Iterator[Metric]:
        for collector, old_name, new_name in self.sources:
            for family in collector.collect():
                renamed = Metric(new_name, family.documentation, family.type, family.unit)
                renamed.samples = [
                    Sample(
                        new_name + sample.name[len(old_name):],
                        sample.labels,
                        sample.value,
                        sample.timestamp,
                        sample.exemplar,
                        sample.native_histogram,
                    )
                    for sample in family.samples
                ]
                yield renamed


class PrometheusStatLogger:
    """Engine metrics for ``GET /metrics``, fed by ``record()`` once per engine step."""

    def __init__(
        self,
        info: MetricsInfo,
        registry: CollectorRegistry | None = None,
        compat: str | None = None,
    ) -> None:
        compat = compat or "none"
        if compat not in COMPAT_CHOICES:
            raise ValueError(f"--metrics-compat must be one of {COMPAT_CHOICES}, got {compat!r}")
        self.info = info
        self.compat = compat
        self.registry = registry if registry is not None else CollectorRegistry()
        self._metrics: list[tuple[Any, str]] = []  # (collector, suffix) for the mirror
        labels = {"model_name": info.model_name, "engine": str(info.engine_index)}
        label_names = list(labels)
        self._labels = labels

        def gauge(suffix: str, doc: str) -> Any:
            metric = Gauge(PREFIX + suffix, doc, label_names, registry=self.registry,
                           multiprocess_mode="mostrecent")
            self._metrics.append((metric, suffix))
            return metric.labels(**labels)

        def counter(suffix: str, doc: str) -> Any:
            metric = Counter(PREFIX + suffix, doc, label_names, registry=self.registry)
            self._metrics.append((metric, suffix))
            return metric.labels(**labels)

        def histogram(suffix: str, doc: str, buckets: list[float] | list[int]) -> Any:
            metric = Histogram(PREFIX + suffix, doc, label_names, buckets=buckets,
                               registry=self.registry)
            self._metrics.append((metric, suffix))
            return metric.labels(**labels)

        # ---- scheduler state
        self.gauge_scheduler_running = gauge(
            "num_requests_running", "Number of requests in model execution batches.")
        self.gauge_scheduler_waiting = gauge(
            "num_requests_waiting", "Number of requests waiting to be processed.")
        self.gauge_kv_cache_usage = gauge(
            "kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.")
        self.counter_prefix_cache_queries = counter(
            "prefix_cache_queries",
            "Prefix cache queries, in terms of number of queried tokens.")
        self.counter_prefix_cache_hits = counter(
            "prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.")
        self.counter_num_preempted_reqs = counter(
            "num_preemptions", "Cumulative number of preemption from the engine.")
        # ---- tokens and requests
        self.counter_prompt_tokens = counter("prompt_tokens", "Number of prefill tokens processed.")
        self.counter_generation_tokens = counter(
            "generation_tokens", "Number of generation tokens processed.")
        success = Counter(PREFIX + "request_success", "Count of successfully processed requests.",
                          [*label_names, "finished_reason"], registry=self.registry)
        self._metrics.append((success, "request_success"))
        self.counter_request_success = {
            reason: success.labels(**labels, finished_reason=reason) for reason in FINISH_REASONS
        }
        self._request_success = success
        max_len_buckets = build_1_2_5_buckets(info.max_model_len)
        self.histogram_num_prompt_tokens_request = histogram(
            "request_prompt_tokens", "Number of prefill tokens processed.", max_len_buckets)
        self.histogram_num_generation_tokens_request = histogram(
            "request_generation_tokens", "Number of generation tokens processed.",
            max_len_buckets)
        self.histogram_iteration_tokens = histogram(
            "iteration_tokens_total", "Histogram of number of tokens per engine_step.",
            ITERATION_TOKENS_BUCKETS)
        self.histogram_max_num_generation_tokens_request = histogram(
            "request_max_num_generation_tokens",
            "Histogram of maximum number of requested generation tokens.", max_len_buckets)
        self.histogram_n_request = histogram(
            "request_params_n", "Histogram of the n request parameter.", PARAMS_N_BUCKETS)
        self.histogram_max_tokens_request = histogram(
            "request_params_max_tokens", "Histogram of the max_tokens request parameter.",
            max_len_buckets)
        # ---- latencies
        self.histogram_time_to_first_token = histogram(
            "time_to_first_token_seconds", "Histogram of time to first token in seconds.",
            TTFT_BUCKETS)
        self.histogram_inter_token_latency = histogram(
            "inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
            ITL_BUCKETS)
        self.histogram_request_time_per_output_token = histogram(
            "request_time_per_output_token_seconds",
            "Histogram of time_per_output_token_seconds per request.", ITL_BUCKETS)
        self.histogram_e2e_time_request = histogram(
            "e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
            REQUEST_LATENCY_BUCKETS)
        self.histogram_queue_time_request = histogram(
            "request_queue_time_seconds",
            "Histogram of time spent in WAITING phase for request.", REQUEST_LATENCY_BUCKETS)
        self.histogram_inference_time_request = histogram(
            "request_inference_time_seconds",
            "Histogram of time spent in RUNNING phase for request.", REQUEST_LATENCY_BUCKETS)
        self.histogram_prefill_time_request = histogram(
            "request_prefill_time_seconds",
            "Histogram of time spent in PREFILL phase for request.", REQUEST_LATENCY_BUCKETS)
        self.histogram_decode_time_request = histogram(
            "request_decode_time_seconds",
            "Histogram of time spent in DECODE phase for request.", REQUEST_LATENCY_BUCKETS)
        # ---- engine configuration
        # cache_config_info is set once the engine core has sized the KV cache (the
        # block count is known only then): at construction if ``info`` has it, else in
        # log_engine_initialized().
        self._config_info = {
            "block_size": str(info.block_size),
            "enable_prefix_caching": str(info.enable_prefix_caching),
            "cache_dtype": "auto",
            "dtype": info.dtype,
        }
        self._cache_info = Gauge(
            PREFIX + "cache_config_info", "Information of the LLMEngine CacheConfig",
            ["num_blocks", "num_gpu_blocks", *self._config_info, "engine"],
            registry=self.registry, multiprocess_mode="mostrecent",
        )
        self._metrics.append((self._cache_info, "cache_config_info"))
        self._engine_index = info.engine_index
        self._cache_info_set = False
        if info.num_blocks > 0:
            self.log_engine_initialized(info.num_blocks)

        # Running totals from the scheduler -> counter increments.
        self._last_prefix_queries = 0
        self._last_prefix_hits = 0
        self._last_preemptions = 0

        if compat == "vllm":
            sources = []
            for metric, suffix in self._metrics:
                sources.append((metric, PREFIX + suffix, "vllm:" + suffix))
                for alias in VLLM_ALIASES.get(suffix, ()):
                    sources.append((metric, PREFIX + suffix, "vllm:" + alias))
            self.registry.register(_RenamedCollector(sources))

    # ----------------------------------------------------------------- recording
    def update_gauges(self, scheduler_stats: Any) -> None:
        """Set the state gauges (also from heartbeats, so they fall to 0 when idle)."""
        self.gauge_scheduler_running.set(scheduler_stats.num_running_reqs)
        self.gauge_scheduler_waiting.set(scheduler_stats.num_waiting_reqs)
        self.gauge_kv_cache_usage.set(scheduler_stats.kv_cache_usage)

    def record(self, scheduler_stats: Any | None, iteration_stats: IterationStats | None) -> None:
        """Take one step's SchedulerStats (engine/messages.py) and IterationStats."""
        if scheduler_stats is not None:
            self.update_gauges(scheduler_stats)
            queries = scheduler_stats.prefix_cache_queries
            hits = scheduler_stats.prefix_cache_hits
            if queries < self._last_prefix_queries or hits < self._last_prefix_hits:
                self._last_prefix_queries = self._last_prefix_hits = 0  # totals were reset
            delta = queries - self._last_prefix_queries
            if delta:
                self.counter_prefix_cache_queries.inc(delta)
            delta = hits - self._last_prefix_hits
            if delta:
                self.counter_prefix_cache_hits.inc(delta)
            self._last_prefix_queries, self._last_prefix_hits = queries, hits
            delta = running_total_delta(self._last_preemptions, scheduler_stats.num_preemptions)
            if delta:
                self.counter_num_preempted_reqs.inc(delta)
            self._last_preemptions = scheduler_stats.num_preemptions
        if iteration_stats is None:
            return
        if iteration_stats.num_prompt_tokens:
            self.counter_prompt_tokens.inc(iteration_stats.num_prompt_tokens)
        if iteration_stats.num_generation_tokens:
            self.counter_generation_tokens.inc(iteration_stats.num_generation_tokens)
        # Tokens the engine ran this step (the scheduler's count; iteration stats as fallback).
        num_step_tokens = (
            scheduler_stats.num_scheduled_tokens
            if scheduler_stats is not None and scheduler_stats.num_scheduled_tokens
            else iteration_stats.num_prompt_tokens + iteration_stats.num_generation_tokens
        )
        if num_step_tokens:
            self.histogram_iteration_tokens.observe(num_step_tokens)
        for value in iteration_stats.max_num_generation_tokens_iter:
            self.histogram_max_num_generation_tokens_request.observe(value)
        for value in iteration_stats.n_params_iter:
            self.histogram_n_request.observe(value)
        for value in iteration_stats.time_to_first_tokens_iter:
            self.histogram_time_to_first_token.observe(value)
        for value in iteration_stats.inter_token_latencies_iter:
            self.histogram_inter_token_latency.observe(value)
        for finished in iteration_stats.finished_requests:
            counter = self.counter_request_success.get(finished.finish_reason)
            if counter is None:
                counter = self._request_success.labels(
                    **self._labels, finished_reason=finished.finish_reason)
                self.counter_request_success[finished.finish_reason] = counter
            counter.inc()
            self.histogram_e2e_time_request.observe(finished.e2e_latency)
            self.histogram_queue_time_request.observe(finished.queued_time)
            self.histogram_prefill_time_request.observe(finished.prefill_time)
            self.histogram_inference_time_request.observe(finished.inference_time)
            self.histogram_decode_time_request.observe(finished.decode_time)
            self.histogram_num_prompt_tokens_request.observe(finished.num_prompt_tokens)
            self.histogram_num_generation_tokens_request.observe(finished.num_generation_tokens)
            if finished.num_generation_tokens > 1:
                # vLLM observes TPOT only where it is defined (more than one output token).
                self.histogram_request_time_per_output_token.observe(
                    finished.mean_time_per_output_token)
            if finished.max_tokens_param is not None:
                self.histogram_max_tokens_request.observe(finished.max_tokens_param)

    def log(self) -> None:
        """Prometheus is scraped, not pushed: nothing to do periodically."""

    def log_engine_initialized(self, num_blocks: int | None = None) -> None:
        """Set cache_config_info once the KV cache's block count is known."""
        if num_blocks is None or self._cache_info_set:
            return
        self._cache_info.labels(
            num_blocks=str(num_blocks),
            num_gpu_blocks=str(num_blocks),  # vLLM's label name for the same thing
            **self._config_info,
            engine=str(self._engine_index),
        ).set(1)
        self._cache_info_set = True

    def generate_latest(self) -> bytes:
        """The text exposition of this engine's registry (what ``GET /metrics`` returns)."""
        return generate_latest(self.registry)


# --------------------------------------------------------------------------- HTTP
DEFAULT_EXCLUDED_HANDLERS = ("/metrics", "/health", "/load", "/ping", "/version", "/server_info")


class HTTPMetrics:
    """HTTP request counts and durations by handler (route template), method and status.

    ``pagedserve:http_requests_total{handler,method,status}`` and
    ``pagedserve:http_request_duration_seconds{handler,method,status}``; with the vLLM
    mirror also prometheus-fastapi-instrumentator's ``http_requests_total`` (status
    grouped as ``2xx``), ``http_request_duration_seconds{handler,method}`` and
    ``http_request_duration_highr_seconds``, the names vLLM's server exports.
    """

    def __init__(self, registry: CollectorRegistry, compat: str | None = None,
                 excluded_handlers: Iterable[str] = DEFAULT_EXCLUDED_HANDLERS) -> None:
        self.excluded_handlers = frozenset(excluded_handlers)
        self.requests = Counter(PREFIX + "http_requests", "HTTP requests by handler and status.",
                                ["handler", "method", "status"], registry=registry)
        self.duration = Histogram(
            PREFIX + "http_request_duration_seconds",
            "HTTP request duration in seconds (until the last byte of the response).",
            ["handler", "method", "status"], buckets=HTTP_DURATION_BUCKETS, registry=registry)
        self.compat = (compat or "none") == "vllm"
        if self.compat:
            self.compat_requests = Counter(
                "http_requests", "Total number of requests by method, status and handler.",
                ["handler", "method", "status"], registry=registry)
            self.compat_duration = Histogram(
                "http_request_duration_seconds",
                "Latency with only few buckets by handler. Made to be only used if aggregation "
                "by handler is important.", ["handler", "method"],
                buckets=HTTP_DURATION_LOWR_BUCKETS, registry=registry)
            self.compat_duration_highr = Histogram(
                "http_request_duration_highr_seconds",
                "Latency with many buckets but no API specific labels. Made for more accurate "
                "percentile calculations.", buckets=HTTP_DURATION_BUCKETS, registry=registry)

    def observe(self, handler: str, method: str, status: int, duration: float) -> None:
        if handler in self.excluded_handlers:
            return
        status_text = str(status)
        self.requests.labels(handler, method, status_text).inc()
        self.duration.labels(handler, method, status_text).observe(duration)
        if self.compat:
            self.compat_requests.labels(handler, method, f"{status // 100}xx").inc()
            self.compat_duration.labels(handler, method).observe(duration)
            self.compat_duration_highr.observe(duration)


class PrometheusMiddleware:
    """Pure-ASGI middleware recording HTTP metrics (streaming-safe: timed to the last byte).

    The handler label is the matched route's template (``/v1/completions``); paths that
    match no route are grouped as ``none`` so scanners cannot blow up the label space.
    """

    def __init__(self, app: Any, http_metrics: HTTPMetrics) -> None:
        self.app = app
        self.http_metrics = http_metrics

    async def __call__(self, scope: Mapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status_code = 500
        recorded = False

        def record() -> None:
            nonlocal recorded
            if recorded:
                return
            recorded = True
            route = scope.get("route")
            handler = getattr(route, "path", None) or "none"
            self.http_metrics.observe(
                handler, scope.get("method", "GET"), status_code, time.perf_counter() - start)

        async def send_wrapper(message: Mapping[str, Any]) -> None:
            nonlocal status_code
            if message["type"] == "http.response.start":
                status_code = int(message["status"])
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                record()

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            record()
