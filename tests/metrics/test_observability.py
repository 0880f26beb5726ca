"""The glue object and per-response timings (no server)."""

from __future__ import annotations

import argparse
from types import SimpleNamespace

import pytest

from pagedserve.engine.messages import SchedulerStats
from pagedserve.metrics.observability import (
    EngineObservability,
    ObservabilityConfig,
    add_observability_flags,
    observability_config_from_args,
    request_timings,
)
from pagedserve.metrics.stats import IterationStats
from pagedserve.outputs import RequestMetrics
from tests.metrics.prom_utils import parse_samples, value

ENGINE_CONFIG = SimpleNamespace(
    model_config=SimpleNamespace(served_model_name="m", model="m", max_model_len=128,
                                 dtype="torch.float32"),
    cache_config=SimpleNamespace(block_size=16, num_blocks=9, enable_prefix_caching=True),
)


def test_timings_object() -> None:
    metrics = RequestMetrics(arrival_time=10.0, first_scheduled_time=10.25,
                             first_token_time=10.5, last_token_time=11.5, finished_time=11.5)
    timings = request_timings(metrics, num_prompt_tokens=12, num_cached_tokens=8,
                              num_completion_tokens=5)
    assert timings == {
        "queue_ms": 250.0, "prefill_ms": 250.0, "ttft_ms": 500.0, "decode_ms": 1000.0,
        "e2e_ms": 1500.0, "prompt_tokens": 12, "cached_tokens": 8, "completion_tokens": 5,
        "tokens_per_second": 4.0,
    }
    empty = request_timings(RequestMetrics(arrival_time=1.0), 3, 0, 0, end_time=2.0)
    assert empty["ttft_ms"] is None and empty["e2e_ms"] == 1000.0
    assert empty["tokens_per_second"] is None


def test_flags_to_config() -> None:
    parser = argparse.ArgumentParser()
    add_observability_flags(parser)
    config = observability_config_from_args(parser.parse_args([]))
    assert config == ObservabilityConfig()
    config = observability_config_from_args(parser.parse_args([
        "--disable-log-stats", "--metrics-compat", "vllm", "--otlp-traces-endpoint",
        "http://127.0.0.1:1", "--otlp-traces-include-text", "--enable-response-timings"]))
    assert not config.log_stats and config.enable_metrics and config.metrics_compat == "vllm"
    assert config.otlp_traces_include_text and config.enable_response_timings
    with pytest.raises(SystemExit):
        parser.parse_args(["--metrics-compat", "nope"])


def test_metrics_text_refreshes_gauges_and_switches() -> None:
    obs = EngineObservability(ENGINE_CONFIG, ObservabilityConfig(log_stats=False))
    assert obs.log_stats and obs.tracer is None
    obs.record(SchedulerStats(num_running_reqs=3, kv_cache_usage=0.5),
               IterationStats(num_prompt_tokens=4))
    s = parse_samples(obs.metrics_text().decode())
    assert value(s, "pagedserve:num_requests_running", model_name="m") == 3
    # A heartbeat's newer state: idle.
    s = parse_samples(obs.metrics_text(SchedulerStats()).decode())
    assert value(s, "pagedserve:num_requests_running", model_name="m") == 0
    assert value(s, "pagedserve:kv_cache_usage_perc", model_name="m") == 0
    assert value(s, "pagedserve:prompt_tokens_total", model_name="m") == 4
    off = EngineObservability(ENGINE_CONFIG, ObservabilityConfig(log_stats=False,
                                                                  enable_metrics=False))
    assert not off.log_stats
    assert "pagedserve:prompt_tokens" not in off.metrics_text(SchedulerStats()).decode()
    assert off.wants_timings(True) and not off.wants_timings(None)
    assert EngineObservability(ENGINE_CONFIG, ObservabilityConfig(
        enable_response_timings=True)).wants_timings(False)
