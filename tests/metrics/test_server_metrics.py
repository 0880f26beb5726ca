"""End to end: the real server (default model) with metrics, the vLLM mirror, tracing to a
real OTLP receiver, per-response timings, the stats log line, and `bench serve`.

One server for the module; every check works on deltas of /metrics around its own
workload, so the tests do not depend on their order.
"""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.entrypoints.utils import BASE_ARGS, RemoteServer
from tests.metrics.otlp_receiver import OTLPReceiver
from tests.metrics.prom_utils import parse_samples

MAX_TOKENS = 6
PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "The three primary colors are",
    "def fibonacci(n):\n    ",
]
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN_ID = "00f067aa0ba902b7"


@pytest.fixture(scope="module")
def receiver():
    with OTLPReceiver() as rx:
        yield rx


@pytest.fixture(scope="module")
def server(receiver):
    args = [*BASE_ARGS, "--metrics-compat", "vllm", "--otlp-traces-endpoint", receiver.endpoint]
    env = {"OTEL_BSP_SCHEDULE_DELAY": "100", "PAGEDSERVE_LOG_STATS_INTERVAL": "0.5"}
    with RemoteServer(args, env=env) as remote:
        yield remote


def scrape(server: RemoteServer) -> dict:
    response = httpx.get(server.url + "/metrics", timeout=30)  # no API key needed
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return parse_samples(response.text)


def total(samples: dict, name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels``."""
    return sum(
        v for (n, ls), v in samples.items()
        if n == name and all((k, str(x)) in ls for k, x in labels.items())
    )


def wait_idle(server: RemoteServer, timeout: float = 15.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(server)
        state = [total(samples, "pagedserve:" + n) for n in
                 ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc")]
        if state == [0, 0, 0]:
            return samples
        assert time.monotonic() < deadline, f"not idle: running/waiting/kv = {state}"
        time.sleep(0.2)


def run_workload(server: RemoteServer) -> list[dict]:
    """Four concurrent requests: completion and chat, streamed and not; usage of each."""
    usages: list[dict] = [{}] * len(PROMPTS)

    def one(index: int) -> None:
        chat = index % 2 == 1
        stream = index >= 2
        body: dict = {"max_tokens": MAX_TOKENS, "ignore_eos": True, "temperature": 0.0}
        if chat:
            body["messages"] = [{"role": "user", "content": PROMPTS[index]}]
        else:
            body["prompt"] = PROMPTS[index]
        path = "/v1/chat/completions" if chat else "/v1/completions"
        with server.http() as client:
            if not stream:
                response = client.post(path, json=body)
                assert response.status_code == 200, response.text
                usages[index] = response.json()["usage"]
                assert "timings" not in response.json()  # off by default
                return
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
            with client.stream("POST", path, json=body) as response:
                assert response.status_code == 200
                for line in response.iter_lines():
                    if line.startswith("data: {"):
                        chunk = json.loads(line[6:])
                        assert "timings" not in chunk
                        if chunk.get("usage"):
                            usages[index] = chunk["usage"]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(PROMPTS))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert all(u.get("completion_tokens") == MAX_TOKENS for u in usages), usages
    return usages


def test_known_workload_counts_exactly(server: RemoteServer) -> None:
    before = wait_idle(server)
    usages = run_workload(server)
    after = wait_idle(server)  # gauges and KV usage back to 0 when idle

    def delta(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    n = len(PROMPTS)
    prompt_tokens = sum(u["prompt_tokens"] for u in usages)
    cached_tokens = sum(u["prompt_tokens_details"]["cached_tokens"] for u in usages)
    p = "pagedserve:"
    assert delta(p + "prompt_tokens_total") == prompt_tokens
    assert delta(p + "generation_tokens_total") == n * MAX_TOKENS
    assert delta(p + "request_success_total", finished_reason="length") == n
    assert delta(p + "request_success_total") == n
    for histogram in ("time_to_first_token_seconds", "e2e_request_latency_seconds",
                      "request_queue_time_seconds", "request_prefill_time_seconds",
                      "request_decode_time_seconds", "request_inference_time_seconds",
                      "request_time_per_output_token_seconds", "request_prompt_tokens",
                      "request_generation_tokens", "request_params_max_tokens",
                      "request_params_n", "request_max_num_generation_tokens"):
        assert delta(p + histogram + "_count") == n, histogram
        assert delta(p + histogram + "_bucket", le="+Inf") == n, histogram
    # One inter-token latency per token after the first: the engine makes one per step.
    assert delta(p + "inter_token_latency_seconds_count") == n * (MAX_TOKENS - 1)
    assert delta(p + "request_prompt_tokens_sum") == prompt_tokens
    assert delta(p + "request_generation_tokens_sum") == n * MAX_TOKENS
    assert delta(p + "request_params_max_tokens_sum") == n * MAX_TOKENS
    assert delta(p + "request_params_n_sum") == n
    # Tokens the engine ran: uncached prompt tokens, and each output token but the last.
    assert delta(p + "iteration_tokens_total_sum") == (
        prompt_tokens - cached_tokens + n * (MAX_TOKENS - 1))
    assert delta(p + "prefix_cache_hits_total") == cached_tokens
    assert delta(p + "prefix_cache_queries_total") >= delta(p + "prefix_cache_hits_total")
    assert delta(p + "num_preemptions_total") == 0
    # Latency parts add up: e2e >= queue + inference.
    e2e = delta(p + "e2e_request_latency_seconds_sum")
    parts = delta(p + "request_queue_time_seconds_sum") + delta(
        p + "request_inference_time_seconds_sum")
    assert 0 < parts <= e2e + 1e-6
    # HTTP by route and status.
    for route in ("/v1/completions", "/v1/chat/completions"):
        assert delta(p + "http_requests_total", handler=route, method="POST", status="200") == 2
        assert delta(p + "http_request_duration_seconds_count", handler=route) == 2
    assert delta(p + "http_requests_total", handler="/metrics") == 0
    # The vLLM mirror (and the instrumentator's HTTP names) count the same.
    assert delta("vllm:prompt_tokens_total") == prompt_tokens
    assert delta("vllm:generation_tokens_total") == n * MAX_TOKENS
    assert delta("vllm:e2e_request_latency_seconds_count") == n
    assert delta("vllm:time_per_output_token_seconds_count") == n * (MAX_TOKENS - 1)
    assert delta("http_requests_total", handler="/v1/completions", status="2xx") == 2
    assert total(after, "vllm:num_requests_running") == 0
    assert total(after, p + "cache_config_info", block_size="16", dtype="float32") == 1
    # The block count the engine core sized after loading the model: 192 MiB of fp32 K and V
    # for Gemma 3 270M (18 layers x 1 KV head x head_dim 256) in 16-token blocks.
    bytes_per_block = 2 * 18 * 1 * 256 * 16 * 4
    num_blocks = str(192 * 2**20 // bytes_per_block)
    assert total(after, p + "cache_config_info", num_blocks=num_blocks, num_gpu_blocks=num_blocks,
                 block_size="16") == 1
    # The periodic stats line (every 0.5 s here) was logged while busy.
    line = re.compile(r"Avg prompt throughput: [\d.]+ tokens/s, Avg generation throughput: "
                      r"[\d.]+ tokens/s, Running: \d+ reqs, Waiting: \d+ reqs, Preemptions: \d+,"
                      r" KV cache usage: [\d.]+%, Prefix cache hit rate: [\d.]+%")
    assert line.search(server.logs()), server.logs()


def test_unauthorized_and_aborted_requests_are_counted(server: RemoteServer) -> None:
    before = wait_idle(server)
    assert httpx.post(server.url + "/v1/completions", json={"prompt": "x"}).status_code == 401
    # A client that leaves mid-stream: its request is aborted and counted as "abort".
    with server.http() as client, client.stream(
        "POST", "/v1/completions",
        json={"prompt": "Count to a hundred:", "max_tokens": 200, "ignore_eos": True,
              "stream": True},
    ) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                break
    after = wait_idle(server)

    def delta(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    assert delta("pagedserve:http_requests_total", status="401") == 1
    assert delta("pagedserve:request_success_total", finished_reason="abort") == 1
    assert delta("pagedserve:request_success_total", finished_reason="length") == 0


def test_span_with_parent_and_attributes(server: RemoteServer, receiver: OTLPReceiver) -> None:
    body = {"prompt": PROMPTS[0], "max_tokens": 4, "ignore_eos": True, "temperature": 0.0,
            "top_p": 0.9, "top_k": 20, "seed": 11}
    headers = {"traceparent": f"00-{TRACE_ID}-{PARENT_SPAN_ID}-01"}
    with server.http() as client:
        response = client.post("/v1/completions", json=body, headers=headers)
    assert response.status_code == 200
    result = response.json()
    deadline = time.monotonic() + 20
    while True:
        spans = [s for s in receiver.spans
                 if s["attributes"].get("gen_ai.response.id") == result["id"]]
        if spans:
            break
        assert time.monotonic() < deadline, "no span exported"
        time.sleep(0.1)
    (span,) = spans
    assert span["trace_id"] == TRACE_ID and span["parent_span_id"] == PARENT_SPAN_ID
    assert span["resource"]["service.name"] == "pagedserve"
    a = span["attributes"]
    usage = result["usage"]
    assert a["gen_ai.operation.name"] == "text_completion"
    assert a["gen_ai.request.model"] == result["model"] == a["llm.model_name"]
    assert (a["gen_ai.request.max_tokens"], a["gen_ai.request.temperature"],
            a["gen_ai.request.top_p"], a["gen_ai.request.top_k"],
            a["gen_ai.request.seed"]) == (4, 0.0, pytest.approx(0.9), 20, 11)
    assert a["gen_ai.response.finish_reasons"] == ["length"]
    assert a["gen_ai.usage.input_tokens"] == a["gen_ai.usage.prompt_tokens"] == (
        usage["prompt_tokens"]) == a["llm.token_count.prompt"]
    assert a["gen_ai.usage.output_tokens"] == a["gen_ai.usage.completion_tokens"] == 4
    assert a["llm.token_count.total"] == usage["total_tokens"]
    assert a["llm.token_count.prompt_details.cache_read"] == (
        usage["prompt_tokens_details"]["cached_tokens"])
    assert a["openinference.span.kind"] == "LLM"
    assert json.loads(a["llm.invocation_parameters"])["max_tokens"] == 4
    latency = {k.removeprefix("gen_ai.latency."): v for k, v in a.items()
               if k.startswith("gen_ai.latency.")}
    assert 0 <= latency["time_in_queue"] <= latency["time_to_first_token"] <= latency["e2e"]
    assert latency["time_in_model_prefill"] + latency["time_in_model_decode"] <= latency["e2e"]
    assert span["end_ns"] - span["start_ns"] == pytest.approx(latency["e2e"] * 1e9, rel=0.01)
    assert "input.value" not in a and "output.value" not in a  # text only with the opt-in


# Server and client clocks are the same machine's; this covers rounding and timer resolution.
CLOCK_SLACK_MS = 2.0


def test_timings_on_request(server: RemoteServer) -> None:
    """The server's timings lie within what the client measured around the same request.

    The server stamps arrival after it has read the request and the first token / the end
    before it sends them, so its ttft and e2e can only be shorter than the client's.
    """
    with server.http() as client:
        started = time.perf_counter()
        response = client.post("/v1/completions", json={
            "prompt": PROMPTS[2], "max_tokens": 4, "ignore_eos": True, "return_timings": True})
        client_total_ms = (time.perf_counter() - started) * 1000.0
        timings = response.json()["timings"]
        assert timings["completion_tokens"] == 4
        assert timings["prompt_tokens"] == response.json()["usage"]["prompt_tokens"]
        assert 0 < timings["ttft_ms"] < timings["e2e_ms"]
        assert timings["e2e_ms"] <= client_total_ms + CLOCK_SLACK_MS
        assert timings["decode_ms"] > 0 and timings["tokens_per_second"] > 0
        assert timings["e2e_ms"] >= timings["ttft_ms"] + timings["decode_ms"] - 0.01
        chunks = []
        client_ttft_ms = None
        started = time.perf_counter()
        with client.stream("POST", "/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3,
            "ignore_eos": True, "stream": True, "return_timings": True,
        }) as stream:
            for line in stream.iter_lines():
                if line.startswith("data: "):
                    chunks.append(line[6:])
                    # The role chunk goes out before any token; the next choice chunk is one.
                    if client_ttft_ms is None and line.startswith("data: {"):
                        choices = json.loads(line[6:])["choices"]
                        if choices and "role" not in choices[0]["delta"]:
                            client_ttft_ms = (time.perf_counter() - started) * 1000.0
        client_total_ms = (time.perf_counter() - started) * 1000.0
    assert chunks[-1] == "[DONE]"
    final = json.loads(chunks[-2])
    assert final["choices"] == [] and final["timings"]["completion_tokens"] == 3
    assert all("timings" not in json.loads(c) for c in chunks[:-2])
    streamed = final["timings"]
    assert client_ttft_ms is not None
    assert 0 < streamed["ttft_ms"] <= client_ttft_ms + CLOCK_SLACK_MS
    assert streamed["ttft_ms"] < streamed["e2e_ms"] <= client_total_ms + CLOCK_SLACK_MS


def test_bench_serve_totals_equal_metrics(server: RemoteServer, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    from pagedserve.entrypoints.cli import main

    before = wait_idle(server)
    rc = main([
        "bench", "serve", "--base-url", server.url, "--api-key", server.api_key,
        "--dataset-name", "random", "--random-input-len", "16", "--random-output-len", "4",
        "--num-prompts", "6", "--max-concurrency", "3", "--ignore-eos", "--seed", "1",
        "--ready-check-timeout-sec", "0", "--disable-tqdm", "--save-result",
        "--result-dir", str(tmp_path), "--result-filename", "bench.json",
    ])
    assert rc == 0
    after = wait_idle(server)
    result = json.loads((tmp_path / "bench.json").read_text())
    assert "============ Serving Benchmark Result ============" in capsys.readouterr().out

    def delta(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    assert result["completed"] == 6 and result["failed"] == 0
    assert result["completed"] == delta("pagedserve:request_success_total")
    assert result["total_input_tokens"] == delta("pagedserve:prompt_tokens_total")
    assert result["total_output_tokens"] == delta("pagedserve:generation_tokens_total") == 24
    assert result["mean_ttft_ms"] > 0 and result["p99_itl_ms"] > 0
