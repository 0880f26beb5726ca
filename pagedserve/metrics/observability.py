"""Glue between the server and the metrics package: one object per engine.

``EngineObservability`` owns what a served engine needs: the stat loggers (Prometheus +
the periodic log line), the HTTP metrics, the tracer, and the per-response ``timings``
switch. The API server builds one from its flags and hands it to AsyncLLM (which calls
``record()`` once per engine-core step) and to the request handlers (which call
``trace_request()`` and ``timings()`` when a request ends). The flags that fill
``ObservabilityConfig`` live in ``pagedserve.entrypoints.observability_args``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry

from pagedserve.metrics.loggers import DEFAULT_LOG_INTERVAL_S, StatLoggerManager
from pagedserve.metrics.prometheus import HTTPMetrics
from pagedserve.metrics.stats import IterationStats
from pagedserve.metrics.tracing import RequestTraceContext, RequestTracer, RequestTraceRecord

logger = logging.getLogger(__name__)

METRICS_CONTENT_TYPE = CONTENT_TYPE_LATEST


@dataclass(frozen=True)
class ObservabilityConfig:
    """Observability settings of a served engine (flags of `pagedserve serve`)."""

    # The periodic stats log line (--disable-log-stats turns it off).
    log_stats: bool = True
    # Engine stats for /metrics (--disable-metrics turns collection off entirely).
    enable_metrics: bool = True
    metrics_compat: str = "none"
    otlp_traces_endpoint: str | None = None
    # Prompt and output text in spans (opt-in: it may be sensitive).
    otlp_traces_include_text: bool = False
    # A `timings` object in every response (else only when a request asks for it).
    enable_response_timings: bool = False
    # Seconds between stats lines while busy ($PAGEDSERVE_LOG_STATS_INTERVAL).
    log_stats_interval: float = DEFAULT_LOG_INTERVAL_S


class EngineObservability:
    """Stat loggers, HTTP metrics and tracer of one served engine."""

    def __init__(self, engine_config: Any, config: ObservabilityConfig | None = None,
                 model_name: str | None = None) -> None:
        self.config = config or ObservabilityConfig()
        self.registry = CollectorRegistry()
        # The served model name (the server's first --served-model-name) labels every metric.
        self.model_name = model_name or engine_config.model_config.model
        self.stat_loggers: StatLoggerManager | None = None
        if self.config.enable_metrics or self.config.log_stats:
            self.stat_loggers = StatLoggerManager.create(
                engine_config,
                model_name=self.model_name,
                log_stats=self.config.log_stats,
                metrics_compat=self.config.metrics_compat,
                registry=self.registry,
                enable_prometheus=self.config.enable_metrics,
                log_interval=self.config.log_stats_interval,
            )
        self.prometheus = self.stat_loggers.prometheus if self.stat_loggers else None
        self.http_metrics = HTTPMetrics(self.registry, self.config.metrics_compat)
        self.tracer: RequestTracer | None = None
        if self.config.otlp_traces_endpoint:
            self.tracer = RequestTracer(
                self.config.otlp_traces_endpoint,
                collect_text=self.config.otlp_traces_include_text,
            )

    @property
    def log_stats(self) -> bool:
        """Whether the front end should compute IterationStats at all."""
        return self.stat_loggers is not None

    def log_engine_initialized(self, num_blocks: int) -> None:
        """Called once the engine core has sized its KV cache (cache_config_info)."""
        if self.stat_loggers is not None:
            self.stat_loggers.log_engine_initialized(num_blocks)

    def record(self, scheduler_stats: Any | None, iteration_stats: IterationStats | None) -> None:
        if self.stat_loggers is not None:
            self.stat_loggers.record(scheduler_stats, iteration_stats)

    def metrics_text(self, latest_scheduler_stats: Any | None = None) -> bytes:
        """The /metrics body; gauges first refreshed from the newest engine state (heartbeat)."""
        from prometheus_client import generate_latest

        if self.prometheus is not None and latest_scheduler_stats is not None:
            self.prometheus.update_gauges(latest_scheduler_stats)
        return generate_latest(self.registry)

    # ---------------------------------------------------------------- per request
    def wants_timings(self, requested: bool | None) -> bool:
        return bool(requested) or self.config.enable_response_timings

    def trace_request(self, record: RequestTraceRecord,
                      headers: Mapping[str, str] | None) -> None:
        """Export a finished request's span (no-op without an endpoint; never raises)."""
        if self.tracer is None:
            return
        try:
            self.tracer.record(record, headers)
        except Exception:  # tracing must never fail a request
            logger.exception("could not record the span of request %s", record.request_id)

    def trace_context(self, headers: Mapping[str, str], operation: str, model: str,
                      prompt: str | list[dict[str, Any]] | None) -> RequestTraceContext | None:
        """The context to attach to an engine request (None when tracing is off)."""
        if self.tracer is None:
            return None
        from pagedserve.metrics.tracing import extract_trace_headers

        return RequestTraceContext(
            headers=extract_trace_headers(headers),
            operation=operation,
            model=model,
            prompt=prompt if self.config.otlp_traces_include_text else None,
        )

    def on_parent_finished(self, parent: Any) -> None:
        """OutputProcessor hook: export the span of a user request whose children all ended."""
        context = getattr(parent, "trace_context", None)
        if self.tracer is None or context is None:
            return
        try:
            record = trace_record_from_parent(parent, context)
        except Exception:  # tracing must never fail a request
            logger.exception("could not build the span of request %s", parent.request_id)
            return
        self.trace_request(record, context.headers)

    def shutdown(self) -> None:
        if self.tracer is not None:
            self.tracer.shutdown()


def trace_record_from_parent(parent: Any, context: RequestTraceContext,
                             end_time: float | None = None) -> RequestTraceRecord:
    """A span record from a finished ParentRequest (engine/output_processor.py) and its children."""
    import time

    children = [parent.children[i] for i in sorted(parent.children)]
    first = children[0]
    end = end_time if end_time is not None else time.time()
    arrival = min(c.arrival_time for c in children)
    scheduled = [c.first_scheduled_time for c in children if c.first_scheduled_time]
    first_tokens = [c.first_token_time for c in children if c.first_token_time]
    last_tokens = [c.last_token_time for c in children if c.last_token_time]
    scheduled_at = min(scheduled) if scheduled else None
    first_token_at = min(first_tokens) if first_tokens else None
    last_token_at = max(last_tokens) if last_tokens else None

    def span(start: float | None, stop: float | None) -> float | None:
        return max(0.0, stop - start) if start is not None and stop is not None else None

    params = parent.params
    finish_reasons = [c.finish_reason or "abort" for c in children]
    outputs = None
    if context.prompt is not None:  # text was opted in
        outputs = [c.detokenizer.output_text if c.detokenizer is not None else "" for c in children]
    return RequestTraceRecord(
        request_id=parent.request_id,
        operation=context.operation,
        model=context.model,
        start_time=arrival,
        end_time=end,
        params={
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "top_k": params.top_k if params.top_k is not None and params.top_k > 0 else None,
            "seed": params.seed,
            "n": params.n,
            "presence_penalty": params.presence_penalty,
            "frequency_penalty": params.frequency_penalty,
            "repetition_penalty": params.repetition_penalty,
            "min_p": params.min_p,
            "ignore_eos": params.ignore_eos,
        },
        finish_reasons=finish_reasons,
        num_prompt_tokens=len(first.prompt_token_ids),
        num_completion_tokens=sum(len(c.output_token_ids) for c in children),
        num_cached_tokens=first.num_cached_tokens,
        n=params.n,
        time_in_queue=span(arrival, scheduled_at),
        time_to_first_token=span(arrival, first_token_at),
        e2e=span(arrival, end),
        time_in_model_prefill=span(scheduled_at, first_token_at),
        time_in_model_decode=span(first_token_at, last_token_at),
        time_in_model_inference=span(scheduled_at, last_token_at),
        prompt=context.prompt,
        outputs=outputs,
        error="the engine failed" if "error" in finish_reasons else None,
    )


def response_timings(outputs: list[Any], num_prompt_tokens: int, num_cached_tokens: int,
                     num_completion_tokens: int) -> dict[str, Any]:
    """``timings`` of a response made of one or more finished RequestOutputs."""
    import time

    from pagedserve.outputs import RequestMetrics

    metrics = [o.metrics for o in outputs if o.metrics is not None]
    if not metrics:
        return request_timings(None, num_prompt_tokens, num_cached_tokens,
                               num_completion_tokens)

    def pick(name: str, fn: Any) -> float | None:
        values = [getattr(m, name) for m in metrics if getattr(m, name) is not None]
        return fn(values) if values else None

    merged = RequestMetrics(
        arrival_time=min(m.arrival_time for m in metrics),
        first_scheduled_time=pick("first_scheduled_time", min),
        first_token_time=pick("first_token_time", min),
        last_token_time=pick("last_token_time", max),
        finished_time=pick("finished_time", max) or time.time(),
    )
    return request_timings(merged, num_prompt_tokens, num_cached_tokens, num_completion_tokens)


def request_timings(metrics: Any, num_prompt_tokens: int, num_cached_tokens: int,
                    num_completion_tokens: int, end_time: float | None = None) -> dict[str, Any]:
    """The per-response ``timings`` object from a RequestOutput's RequestMetrics.

    Milliseconds: queue (arrival -> first scheduled), prefill (scheduled -> first token),
    ttft (arrival -> first token), decode (first -> last token), e2e (arrival -> end);
    ``tokens_per_second`` is the decode rate ((completion tokens - 1) / decode time).
    """
    def ms(start: float | None, end: float | None) -> float | None:
        if start is None or end is None:
            return None
        return round(max(0.0, end - start) * 1000.0, 3)

    arrival = metrics.arrival_time if metrics is not None else None
    scheduled = metrics.first_scheduled_time if metrics is not None else None
    first = metrics.first_token_time if metrics is not None else None
    last = metrics.last_token_time if metrics is not None else None
    end = end_time if end_time is not None else (
        (metrics.finished_time or last) if metrics is not None else None)
    decode_ms = ms(first, last)
    tokens_per_second = None
    if decode_ms and num_completion_tokens > 1:
        tokens_per_second = round((num_completion_tokens - 1) / (decode_ms / 1000.0), 3)
    return {
        "queue_ms": ms(arrival, scheduled),
        "prefill_ms": ms(scheduled, first),
        "ttft_ms": ms(arrival, first),
        "decode_ms": decode_ms,
        "e2e_ms": ms(arrival, end),
        "prompt_tokens": num_prompt_tokens,
        "cached_tokens": num_cached_tokens,
        "completion_tokens": num_completion_tokens,
        "tokens_per_second": tokens_per_second,
    }
