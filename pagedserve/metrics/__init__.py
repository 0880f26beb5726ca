"""Observability: per-step stats, Prometheus collectors, the stats log line, tracing."""

from pagedserve.metrics.loggers import LoggingStatLogger, StatLoggerManager
from pagedserve.metrics.stats import (
    FinishedRequestStats,
    IterationStats,
    RequestStateStats,
)

__all__ = [
    "FinishedRequestStats",
    "IterationStats",
    "LoggingStatLogger",
    "RequestStateStats",
    "StatLoggerManager",
]
