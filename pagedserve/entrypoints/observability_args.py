"""Flags of `pagedserve serve` for metrics, the stats log line, tracing and timings, and the
``ObservabilityConfig`` they make (the metrics package itself knows no flags)."""

from __future__ import annotations

import argparse

from pagedserve import envs
from pagedserve.metrics.loggers import DEFAULT_LOG_INTERVAL_S
from pagedserve.metrics.observability import ObservabilityConfig
from pagedserve.metrics.prometheus import COMPAT_CHOICES


def add_observability_flags(parser: argparse.ArgumentParser) -> None:
    """Flags of `pagedserve serve` for metrics, the stats log, tracing and timings."""
    group = parser.add_argument_group("observability")
    group.add_argument("--disable-log-stats", action="store_true",
                       help="do not log the periodic stats line (metrics stay on)")
    group.add_argument("--disable-metrics", action="store_true",
                       help="collect no engine stats at all (/metrics keeps HTTP metrics only)")
    group.add_argument("--metrics-compat", default="none", choices=COMPAT_CHOICES,
                       help="also expose every metric under vLLM's vllm: names")
    group.add_argument("--otlp-traces-endpoint", default=None, metavar="URL",
                       help="export one OpenTelemetry span per request to this OTLP "
                       "endpoint (http/protobuf, e.g. http://127.0.0.1:4318; gRPC with "
                       "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL=grpc)")
    group.add_argument("--otlp-traces-include-text", action="store_true",
                       help="put prompt and output text in spans (off: may be sensitive)")
    group.add_argument("--enable-response-timings", action="store_true",
                       help="add a `timings` object to every response (else only to "
                       "requests with \"return_timings\": true)")


def observability_config_from_args(args: argparse.Namespace) -> ObservabilityConfig:
    """The config of the flags above (absent ones keep their defaults) and the environment."""
    interval = envs.PAGEDSERVE_LOG_STATS_INTERVAL
    return ObservabilityConfig(
        log_stats_interval=DEFAULT_LOG_INTERVAL_S if interval is None else interval,
        log_stats=not getattr(args, "disable_log_stats", False),
        enable_metrics=not getattr(args, "disable_metrics", False),
        metrics_compat=getattr(args, "metrics_compat", None) or "none",
        otlp_traces_endpoint=getattr(args, "otlp_traces_endpoint", None),
        otlp_traces_include_text=getattr(args, "otlp_traces_include_text", False),
        enable_response_timings=getattr(args, "enable_response_timings", False),
    )
