"""The glue object and per-response timings (no server)."""

from __future__ import annotations

import argparse
from types import SimpleNamespace

import pytest

from pagedserve.engine.messages import SchedulerStats
from pagedserve.entrypoints.observability_args import (
    add_observability_flags,
    observability_config_from_args,
)
from pagedserve.metrics.observability import (
    EngineObservability,
    ObservabilityConfig,
    request_timings,
    response_timings,
)
from pagedserve.metrics.stats import IterationStats
from pagedserve.outputs import RequestMetrics
from tests.metrics.prom_utils import parse_samples, value

ENGINE_CONFIG = SimpleNamespace(
    model_config=SimpleNamespace(model="m", max_model_len=128,
                                 dtype="torch.float32"),
    cache_config=SimpleNamespace(block_size=16, num_blocks=9, enable_prefix_caching=True),
)


def test_timings_object() -> None:
    # Every interval distinct (and exact in binary), so a field computed from the wrong
    # pair of timestamps shows: queue 0.125 s, prefill 0.375 s, decode 1 s, finish 0.25 s later.
    metrics = RequestMetrics(arrival_time=100.0, first_scheduled_time=100.125,
                             first_token_time=100.5, last_token_time=101.5, finished_time=101.75)
    timings = request_timings(metrics, num_prompt_tokens=12, num_cached_tokens=8,
                              num_completion_tokens=5)
    assert timings == {
        "queue_ms": 125.0, "prefill_ms": 375.0, "ttft_ms": 500.0, "decode_ms": 1000.0,
        "e2e_ms": 1750.0, "prompt_tokens": 12, "cached_tokens": 8, "completion_tokens": 5,
        "tokens_per_second": 4.0,  # (5 - 1) tokens after the first, over 1 s of decode
    }
    # An explicit end overrides finished_time.
    assert request_timings(metrics, 12, 8, 5, end_time=102.0)["e2e_ms"] == 2000.0
    # No finished_time: the request ends at its last token.
    unfinished = RequestMetrics(arrival_time=100.0, first_scheduled_time=100.125,
                                first_token_time=100.5, last_token_time=101.5)
    assert request_timings(unfinished, 12, 0, 5)["e2e_ms"] == 1500.0
    empty = request_timings(RequestMetrics(arrival_time=1.0), 3, 0, 0, end_time=2.0)
    assert empty["ttft_ms"] is None and empty["e2e_ms"] == 1000.0
    assert empty["queue_ms"] is None and empty["prefill_ms"] is None
    assert empty["tokens_per_second"] is None
    # A single token: no decode rate.
    one = RequestMetrics(arrival_time=100.0, first_scheduled_time=100.125,
                         first_token_time=100.5, last_token_time=100.5, finished_time=100.5)
    assert request_timings(one, 3, 0, 1)["tokens_per_second"] is None


def test_response_timings_merge_outputs() -> None:
    """A response of several outputs spans the earliest arrival to the latest end."""
    a = RequestMetrics(arrival_time=100.0, first_scheduled_time=100.125,
                       first_token_time=100.5, last_token_time=101.0, finished_time=101.25)
    b = RequestMetrics(arrival_time=100.25, first_scheduled_time=100.375,
                       first_token_time=100.75, last_token_time=102.0, finished_time=102.5)
    outputs = [SimpleNamespace(metrics=b), SimpleNamespace(metrics=None),
               SimpleNamespace(metrics=a)]
    assert response_timings(outputs, 20, 16, 7) == {
        "queue_ms": 125.0, "prefill_ms": 375.0, "ttft_ms": 500.0, "decode_ms": 1500.0,
        "e2e_ms": 2500.0, "prompt_tokens": 20, "cached_tokens": 16, "completion_tokens": 7,
        "tokens_per_second": 4.0,  # 6 tokens after the first over 1.5 s
    }
    none = response_timings([SimpleNamespace(metrics=None)], 3, 0, 2)
    assert none["ttft_ms"] is None and none["e2e_ms"] is None and none["prompt_tokens"] == 3


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


def test_log_stats_interval_comes_from_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("PAGEDSERVE_LOG_STATS_INTERVAL", "0.5")
    assert observability_config_from_args(argparse.Namespace()).log_stats_interval == 0.5
    monkeypatch.setenv("PAGEDSERVE_LOG_STATS_INTERVAL", "0")
    with pytest.raises(ValueError, match="PAGEDSERVE_LOG_STATS_INTERVAL"):
        observability_config_from_args(argparse.Namespace())


def test_metrics_are_labelled_with_the_served_name() -> None:
    """The server passes its served name; the engine config's model name is the fallback."""
    obs = EngineObservability(ENGINE_CONFIG, ObservabilityConfig(log_stats=False),
                              model_name="served")
    obs.record(SchedulerStats(num_running_reqs=2), None)
    s = parse_samples(obs.metrics_text().decode())
    assert value(s, "pagedserve:num_requests_running", model_name="served") == 2


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
