"""Prometheus collectors fed with synthetic stats give exact exposition values."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route

from pagedserve.engine.messages import EngineCoreOutput, SchedulerStats
from pagedserve.metrics.prometheus import (
    TTFT_BUCKETS,
    HTTPMetrics,
    MetricsInfo,
    PrometheusMiddleware,
    PrometheusStatLogger,
    build_1_2_5_buckets,
)
from pagedserve.metrics.stats import IterationStats, RequestStateStats
from tests.metrics.prom_utils import family_names, parse_samples, value

INFO = MetricsInfo(model_name="tiny", max_model_len=1000, block_size=16, num_blocks=65,
                   enable_prefix_caching=True, dtype="bfloat16")
LABELS = {"model_name": "tiny", "engine": "0"}
DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "pagedserve-dashboard.json"


def _workload(logger: PrometheusStatLogger) -> None:
    """Two requests: A (prompt 10, 3 tokens, length) and B (prompt 20, 1 token, stop)."""
    a = RequestStateStats(arrival_time=0.0)
    b = RequestStateStats(arrival_time=0.0)
    step1 = IterationStats(iteration_timestamp=0.5)
    step1.update_from_output(EngineCoreOutput("a", [1], first_scheduled_time=0.1), 0.4, 10, a)
    step1.update_from_output(EngineCoreOutput("b", [2], first_scheduled_time=0.2, finish_reason="stop"),
                             0.4, 20, b)
    step1.update_from_finished_request("stop", 20, 8, b)
    step1.update_from_finished_parent(1, 1)
    logger.record(SchedulerStats(num_running_reqs=2, num_waiting_reqs=1, kv_cache_usage=0.25,
                                 prefix_cache_queries=30, prefix_cache_hits=16,
                                 num_scheduled_tokens=30), step1)
    step2 = IterationStats(iteration_timestamp=0.7)
    step2.update_from_output(EngineCoreOutput("a", [3]), 0.45, 10, a)
    logger.record(SchedulerStats(num_running_reqs=1, kv_cache_usage=0.125, prefix_cache_queries=30,
                                 prefix_cache_hits=16, num_preemptions=2,
                                 num_scheduled_tokens=1), step2)
    step3 = IterationStats(iteration_timestamp=1.0)
    step3.update_from_output(EngineCoreOutput("a", [4], finish_reason="length"), 0.6, 10, a)
    step3.update_from_finished_request("length", 10, 3, a)
    step3.update_from_finished_parent(1, 3)
    logger.record(SchedulerStats(prefix_cache_queries=30, prefix_cache_hits=16, num_preemptions=2,
                                 num_scheduled_tokens=1), step3)
    # Idle step: only scheduler state.
    logger.record(SchedulerStats(prefix_cache_queries=30, prefix_cache_hits=16, num_preemptions=2),
                  IterationStats(iteration_timestamp=2.0))


def test_exact_values_after_synthetic_workload() -> None:
    logger = PrometheusStatLogger(INFO)
    _workload(logger)
    s = parse_samples(logger.generate_latest().decode())
    p = "pagedserve:"
    assert value(s, p + "prompt_tokens_total", **LABELS) == 30
    assert value(s, p + "generation_tokens_total", **LABELS) == 4
    assert value(s, p + "request_success_total", finished_reason="stop", **LABELS) == 1
    assert value(s, p + "request_success_total", finished_reason="length", **LABELS) == 1
    assert value(s, p + "request_success_total", finished_reason="abort", **LABELS) == 0
    assert value(s, p + "prefix_cache_queries_total", **LABELS) == 30
    assert value(s, p + "prefix_cache_hits_total", **LABELS) == 16
    assert value(s, p + "num_preemptions_total", **LABELS) == 2
    # Gauges follow the last step: idle.
    assert value(s, p + "num_requests_running", **LABELS) == 0
    assert value(s, p + "num_requests_waiting", **LABELS) == 0
    assert value(s, p + "kv_cache_usage_perc", **LABELS) == 0
    # Histograms.
    assert value(s, p + "time_to_first_token_seconds_count", **LABELS) == 2
    assert value(s, p + "time_to_first_token_seconds_sum", **LABELS) == pytest.approx(1.0)
    assert value(s, p + "time_to_first_token_seconds_bucket", le="0.25", **LABELS) == 0
    assert value(s, p + "time_to_first_token_seconds_bucket", le="0.5", **LABELS) == 2
    assert value(s, p + "inter_token_latency_seconds_count", **LABELS) == 2
    assert value(s, p + "inter_token_latency_seconds_sum", **LABELS) == pytest.approx(0.2)
    assert value(s, p + "inter_token_latency_seconds_bucket", le="0.05", **LABELS) == 1
    assert value(s, p + "inter_token_latency_seconds_bucket", le="0.15", **LABELS) == 2
    assert value(s, p + "e2e_request_latency_seconds_count", **LABELS) == 2
    assert value(s, p + "e2e_request_latency_seconds_sum", **LABELS) == pytest.approx(1.5)
    assert value(s, p + "request_queue_time_seconds_sum", **LABELS) == pytest.approx(0.3)
    assert value(s, p + "request_prefill_time_seconds_sum", **LABELS) == pytest.approx(0.5)
    assert value(s, p + "request_decode_time_seconds_sum", **LABELS) == pytest.approx(0.2)
    assert value(s, p + "request_inference_time_seconds_sum", **LABELS) == pytest.approx(0.7)
    # TPOT only for the request with more than one token: (0.6 - 0.4) / 2.
    assert value(s, p + "request_time_per_output_token_seconds_count", **LABELS) == 1
    assert value(s, p + "request_time_per_output_token_seconds_sum", **LABELS) == pytest.approx(0.1)
    assert value(s, p + "request_prompt_tokens_count", **LABELS) == 2
    assert value(s, p + "request_prompt_tokens_sum", **LABELS) == 30
    assert value(s, p + "request_prompt_tokens_bucket", le="10.0", **LABELS) == 1
    assert value(s, p + "request_generation_tokens_sum", **LABELS) == 4
    assert value(s, p + "request_params_max_tokens_sum", **LABELS) == 11
    assert value(s, p + "request_params_n_count", **LABELS) == 2
    assert value(s, p + "request_params_n_bucket", le="1.0", **LABELS) == 2
    assert value(s, p + "request_max_num_generation_tokens_sum", **LABELS) == 4
    # Three busy steps (30, 1, 1 tokens); the idle step is not a step.
    assert value(s, p + "iteration_tokens_total_count", **LABELS) == 3
    assert value(s, p + "iteration_tokens_total_sum", **LABELS) == 32
    assert value(s, p + "iteration_tokens_total_bucket", le="1.0", **LABELS) == 2
    info = value(s, p + "cache_config_info", block_size="16", num_blocks="65",
                 enable_prefix_caching="True", dtype="bfloat16")
    assert info == 1


def test_buckets_match_vllm() -> None:
    assert build_1_2_5_buckets(100) == [1, 2, 5, 10, 20, 50, 100]
    assert build_1_2_5_buckets(1000)[-1] == 1000
    text = PrometheusStatLogger(INFO).generate_latest().decode()
    les = re.findall(r'pagedserve:time_to_first_token_seconds_bucket\{[^}]*le="([^"]+)"', text)
    assert [float(x) for x in les[:-1]] == TTFT_BUCKETS and les[-1] == "+Inf"


def test_running_totals_reset_and_separate_registries() -> None:
    first, second = PrometheusStatLogger(INFO), PrometheusStatLogger(INFO)
    first.record(SchedulerStats(prefix_cache_queries=100, prefix_cache_hits=40, num_preemptions=3),
                 None)
    # The prefix cache was reset: totals restart from 0; the counter keeps counting.
    first.record(SchedulerStats(prefix_cache_queries=10, prefix_cache_hits=5, num_preemptions=3),
                 None)
    s = parse_samples(first.generate_latest().decode())
    assert value(s, "pagedserve:prefix_cache_queries_total", **LABELS) == 110
    assert value(s, "pagedserve:prefix_cache_hits_total", **LABELS) == 45
    assert value(s, "pagedserve:num_preemptions_total", **LABELS) == 3
    s2 = parse_samples(second.generate_latest().decode())
    assert value(s2, "pagedserve:prefix_cache_queries_total", **LABELS) == 0


def test_vllm_compat_mirrors_every_metric() -> None:
    plain = PrometheusStatLogger(INFO)
    compat = PrometheusStatLogger(INFO, compat="vllm")
    _workload(compat)
    text = compat.generate_latest().decode()
    names = family_names(text)
    ours = {n for n in names if n.startswith("pagedserve:")}
    assert ours == family_names(plain.generate_latest().decode())
    for name in ours:
        assert "vllm:" + name.removeprefix("pagedserve:") in names
    s = parse_samples(text)
    for name in ("prompt_tokens_total", "generation_tokens_total",
                 "time_to_first_token_seconds_count", "e2e_request_latency_seconds_sum"):
        assert value(s, "vllm:" + name, **LABELS) == value(s, "pagedserve:" + name, **LABELS)
    # vLLM's deprecated aliases, still used by older dashboards.
    assert value(s, "vllm:time_per_output_token_seconds_count", **LABELS) == 2
    assert value(s, "vllm:gpu_prefix_cache_hits_total", **LABELS) == 16
    assert "vllm:gpu_cache_usage_perc" in names
    assert not any(n.startswith("vllm:") for n in family_names(plain.generate_latest().decode()))
    with pytest.raises(ValueError, match="metrics-compat"):
        PrometheusStatLogger(INFO, compat="sglang")


def test_dashboard_queries_only_exposed_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    registry = CollectorRegistry()
    logger = PrometheusStatLogger(INFO, registry)
    http = HTTPMetrics(registry)
    http.observe("/v1/completions", "POST", 200, 0.1)
    _workload(logger)
    exposed = {name for name, _ in parse_samples(logger.generate_latest().decode())}
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"pagedserve:[a-z0-9_]+", e)}
    assert len(used) >= 15
    assert used <= exposed, used - exposed


def _app(http_metrics: HTTPMetrics) -> PrometheusMiddleware:
    async def ok(request):  # noqa: ANN001, ANN202
        return JSONResponse({"ok": True})

    async def fail(request):  # noqa: ANN001, ANN202
        return JSONResponse({"error": "bad"}, status_code=400)

    async def stream(request):  # noqa: ANN001, ANN202
        async def body():  # noqa: ANN202
            for i in range(3):
                await asyncio.sleep(0.05)
                yield f"data: {i}\n\n"
        return StreamingResponse(body(), media_type="text/event-stream")

    async def metrics(request):  # noqa: ANN001, ANN202
        return PlainTextResponse("")

    app = Starlette(routes=[
        Route("/v1/models/{name}", ok), Route("/v1/completions", fail, methods=["POST"]),
        Route("/v1/stream", stream), Route("/metrics", metrics),
    ])
    return PrometheusMiddleware(app, http_metrics)


def test_http_middleware_counts_by_route_and_status() -> None:
    registry = CollectorRegistry()
    http_metrics = HTTPMetrics(registry, compat="vllm")
    app = _app(http_metrics)

    async def drive() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            assert (await client.get("/v1/models/a")).status_code == 200
            assert (await client.get("/v1/models/b")).status_code == 200
            assert (await client.post("/v1/completions")).status_code == 400
            assert (await client.get("/v1/stream")).status_code == 200
            assert (await client.get("/nope")).status_code == 404
            assert (await client.get("/metrics")).status_code == 200

    asyncio.run(drive())
    from prometheus_client import generate_latest

    s = parse_samples(generate_latest(registry).decode())
    p = "pagedserve:http_requests_total"
    assert value(s, p, handler="/v1/models/{name}", method="GET", status="200") == 2
    assert value(s, p, handler="/v1/completions", method="POST", status="400") == 1
    assert value(s, p, handler="/v1/stream", method="GET", status="200") == 1
    assert value(s, p, handler="none", method="GET", status="404") == 1
    assert not [k for k in s if k[0] == p and ("handler", "/metrics") in k[1]]
    # The stream's duration covers its whole body (3 x 50 ms).
    assert value(s, "pagedserve:http_request_duration_seconds_sum", handler="/v1/stream") >= 0.14
    assert value(s, "pagedserve:http_request_duration_seconds_count",
                 handler="/v1/models/{name}") == 2
    # prometheus-fastapi-instrumentator's names (what vLLM exports).
    assert value(s, "http_requests_total", handler="/v1/completions", status="4xx") == 1
    assert value(s, "http_request_duration_highr_seconds_count") == 5
