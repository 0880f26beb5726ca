"""`bench serve`: metric computation on known timings, datasets, and a full run against a
small OpenAI-compatible streaming server started by the test."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from pagedserve.benchmarks.serve import get_request
from pagedserve.benchmarks.serve_datasets import (
    SampleRequest,
    get_bench_tokenizer,
    sample_custom,
    sample_prefix_repetition,
    sample_random,
    sample_sharegpt,
)
from pagedserve.benchmarks.serve_metrics import (
    RequestFuncOutput,
    calculate_metrics,
    format_report,
    parse_goodput,
)


def _output(ttft: float, itl: list[float], tokens: int, prompt_len: int = 10,
            start: float = 0.0) -> RequestFuncOutput:
    return RequestFuncOutput(success=True, ttft=ttft, itl=itl, latency=ttft + sum(itl),
                             output_tokens=tokens, prompt_len=prompt_len, start_time=start)


def test_metrics_on_known_timings() -> None:
    outputs = [
        _output(0.1, [0.02, 0.02, 0.02], 4, prompt_len=10, start=0.0),   # latency 0.16
        _output(0.3, [0.05], 2, prompt_len=20, start=0.1),               # latency 0.35
        _output(0.2, [], 1, prompt_len=30, start=1.0),                   # latency 0.2
        RequestFuncOutput(success=False, error="HTTP 500", prompt_len=40),
    ]
    m = calculate_metrics(outputs, 2.0, None, [50, 99], parse_goodput(["ttft:250", "tpot:30"]))
    assert (m.completed, m.failed, m.total_input, m.total_output) == (3, 1, 60, 7)
    assert m.request_throughput == pytest.approx(1.5)
    assert m.output_throughput == pytest.approx(3.5)
    assert m.total_token_throughput == pytest.approx(33.5)
    ttft = m.stats_ms["ttft"]
    assert ttft["mean"] == pytest.approx(200.0) and ttft["median"] == pytest.approx(200.0)
    assert ttft["std"] == pytest.approx(np.std([100, 300, 200]))
    assert ttft["percentiles"][1] == (99, pytest.approx(np.percentile([100, 300, 200], 99)))
    # TPOT: (latency - ttft) / (tokens - 1), only for requests with > 1 token.
    assert m.stats_ms["tpot"]["mean"] == pytest.approx((20.0 + 50.0) / 2)
    assert m.stats_ms["itl"]["mean"] == pytest.approx(np.mean([20, 20, 20, 50]))
    assert m.stats_ms["e2el"]["median"] == pytest.approx(200.0)
    # Goodput: ttft <= 250 ms and tpot <= 30 ms -> requests 1 and 3 (tpot 0 for 1 token).
    assert m.request_goodput == pytest.approx(2 / 2.0)
    # Tokens per second from start: request 1 all in second 0, 2 in second 0, 3 in 1.
    assert m.tokens_per_second[:2] == [6.0, 1.0] and m.max_output_tokens_per_s == 6.0
    assert m.max_concurrent_requests == 2

    report, result = format_report(m, outputs, 2.0, ["ttft", "tpot", "itl", "e2el"],
                                   request_rate=4.0, max_concurrency=8,
                                   goodput={"ttft": 250.0})
    lines = report.splitlines()
    assert lines[0] == "{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=50, c="=")
    assert lines[0] == "============ Serving Benchmark Result ============"
    assert lines[1] == "Successful requests:                     3         "
    assert "Benchmark duration (s):                  2.00      " in lines
    assert "Total input tokens:                      60        " in lines
    assert "Total generated tokens:                  7         " in lines
    assert "Request throughput (req/s):              1.50      " in lines
    assert "Request goodput (req/s):                 1.00      " in lines
    assert "Maximum request concurrency:             8         " in lines
    for header in ("Time to First Token", "Time per Output Token (excl. 1st token)",
                   "Inter-token Latency", "End-to-end Latency"):
        assert "{s:{c}^{n}}".format(s=header, n=50, c="-") in lines
    assert "---------------Time to First Token----------------" in lines
    assert "Mean TTFT (ms):                          200.00    " in lines
    assert "P99 TTFT (ms):" in report and "P50 E2EL (ms):" in report
    assert lines[-1] == "=" * 50
    for key in ("completed", "total_input_tokens", "total_output_tokens", "request_throughput",
                "output_throughput", "total_token_throughput", "mean_ttft_ms", "median_ttft_ms",
                "std_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "p50_itl_ms", "p99_e2el_ms",
                "ttfts", "itls", "input_lens", "output_lens", "errors", "generated_texts",
                "duration", "request_goodput"):
        assert key in result, key
    assert result["errors"][3] == "HTTP 500" and result["output_lens"] == [4, 2, 1, 0]


def test_goodput_parsing() -> None:
    assert parse_goodput(["ttft:500", "e2el:1000.5"]) == {"ttft": 500.0, "e2el": 1000.5}
    for bad in ("ttft", "foo:1", "tpot:x", "tpot:-1"):
        with pytest.raises(ValueError):
            parse_goodput([bad])


def test_arrivals_poisson_and_burst() -> None:
    requests = [SampleRequest("p", 1, 1)] * 40

    async def timed(rate: float, burstiness: float) -> list[float]:
        start = time.perf_counter()
        times = []
        async for _ in get_request(requests, rate, burstiness, np.random.default_rng(0)):
            times.append(time.perf_counter() - start)
        return times

    instant = asyncio.run(timed(float("inf"), 1.0))
    assert instant[-1] < 0.05
    poisson = asyncio.run(timed(200.0, 1.0))
    # 39 gaps of mean 5 ms.
    assert 0.1 < poisson[-1] < 0.6
    with pytest.raises(ValueError):
        asyncio.run(timed(10.0, 0.0))


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):  # noqa: ANN001, ANN201
    return get_bench_tokenizer(tiny_model_dir("llama"))


def test_datasets(tokenizer, tmp_path: Path) -> None:  # noqa: ANN001
    random_a = sample_random(tokenizer, 12, 32, 8, range_ratio=0.25, prefix_len=4, seed=3)
    random_b = sample_random(tokenizer, 12, 32, 8, range_ratio=0.25, prefix_len=4, seed=3)
    assert [r.prompt for r in random_a] == [r.prompt for r in random_b]  # reproducible
    for r in random_a:
        assert r.prompt_len == len(tokenizer.encode(r.prompt, add_special_tokens=False))
        assert r.prompt_len <= 4 + 40 and 6 <= r.expected_output_len <= 10
    assert len({r.prompt for r in random_a}) >= 10  # a 384-token vocabulary repeats itself
    fixed = sample_random(tokenizer, 3, 16, 5, seed=0)
    assert [r.expected_output_len for r in fixed] == [5, 5, 5]

    prefixed = sample_prefix_repetition(tokenizer, 8, prefix_len=16, suffix_len=8,
                                        num_prefixes=2, output_len=4, seed=0)
    assert len(prefixed) == 8 and all(r.expected_output_len == 4 for r in prefixed)
    heads = {r.prompt[:10] for r in prefixed}
    assert len(heads) == 2

    sharegpt = tmp_path / "sharegpt.json"
    sharegpt.write_text(json.dumps([
        {"conversations": [{"from": "human", "value": "Tell me a story about a cat and a dog"},
                           {"from": "gpt", "value": "Once upon a time there was a cat."}]},
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "x"}]},
        {"conversations": [{"from": "human", "value": "only one turn"}]},
    ]))
    samples = sample_sharegpt(tokenizer, str(sharegpt), 5)
    assert len(samples) == 1 and samples[0].prompt.startswith("Tell me")
    assert samples[0].expected_output_len == len(
        tokenizer.encode("Once upon a time there was a cat.", add_special_tokens=False))
    assert sample_sharegpt(tokenizer, str(sharegpt), 5, output_len=7)[0].expected_output_len == 7

    custom = tmp_path / "prompts.jsonl"
    custom.write_text('{"prompt": "What is 2+2?"}\n\n{"prompt": "Name a color."}\n')
    raw = sample_custom(tokenizer, str(custom), 5, output_len=9, skip_chat_template=True)
    assert sorted(r.prompt for r in raw) == ["Name a color.", "What is 2+2?"]
    templated = sample_custom(tokenizer, str(custom), 5, output_len=9)
    assert all(r.prompt != "Name a color." and "Name a color." in r.prompt or
               "What is 2+2?" in r.prompt for r in templated)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no prompt"}\n')
    with pytest.raises(ValueError, match="prompt"):
        sample_custom(tokenizer, str(bad), 1)
    with pytest.raises(ValueError):
        sample_sharegpt(tokenizer, str(tmp_path / "missing.json"), 1)


# --------------------------------------------------------------------------- a fake server
class FakeServer:
    """A streaming /v1/completions server: max_tokens chunks, 5 ms apart, then usage."""

    def __init__(self, tokenizer) -> None:  # noqa: ANN001
        import uvicorn
        from starlette.applications import Starlette
        from starlette.requests import Request
        from starlette.responses import JSONResponse, StreamingResponse
        from starlette.routing import Route

        self.tokenizer = tokenizer
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.num_requests = 0

        async def completions(request: Request):  # noqa: ANN202
            body = await request.json()
            assert body["stream"] and body["stream_options"]["include_usage"]
            assert body["model"] == "fake-model"
            prompt_tokens = len(self.tokenizer.encode(body["prompt"]))  # with BOS
            max_tokens = body["max_tokens"]
            self.num_requests += 1
            self.prompt_tokens += prompt_tokens
            self.completion_tokens += max_tokens

            async def stream():  # noqa: ANN202
                for i in range(max_tokens):
                    await asyncio.sleep(0.005)
                    chunk = {"id": "c", "object": "text_completion", "model": "fake-model",
                             "choices": [{"index": 0, "text": f" t{i}", "finish_reason":
                                          "length" if i == max_tokens - 1 else None}]}
                    yield f"data: {json.dumps(chunk)}\n\n"
                usage = {"prompt_tokens": prompt_tokens, "completion_tokens": max_tokens,
                         "total_tokens": prompt_tokens + max_tokens}
                yield f"data: {json.dumps({'id': 'c', 'choices': [], 'usage': usage})}\n\n"
                yield "data: [DONE]\n\n"

            return StreamingResponse(stream(), media_type="text/event-stream")

        async def models(request: Request):  # noqa: ANN202
            return JSONResponse({"object": "list", "data": [{"id": "fake-model"}]})

        app = Starlette(routes=[Route("/v1/completions", completions, methods=["POST"]),
                                Route("/v1/models", models)])
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> FakeServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:  # noqa: ANN002
        self.server.should_exit = True
        self.thread.join(10)


def test_bench_serve_cli_against_streaming_server(tokenizer, tiny_model_dir, tmp_path, capsys):  # noqa: ANN001
    from pagedserve.entrypoints.cli import main

    with FakeServer(tokenizer) as server:
        rc = main([
            "bench", "serve", "--base-url", f"http://127.0.0.1:{server.port}",
            "--tokenizer", tiny_model_dir("llama"), "--dataset-name", "random",
            "--random-input-len", "24", "--random-output-len", "6", "--random-range-ratio", "0.5",
            "--num-prompts", "12", "--request-rate", "100", "--max-concurrency", "4",
            "--ignore-eos", "--percentile-metrics", "ttft,tpot,itl,e2el",
            "--metric-percentiles", "50,99", "--goodput", "ttft:5000",
            "--save-result", "--save-detailed", "--result-dir", str(tmp_path),
            "--result-filename", "out.json", "--plot", str(tmp_path / "plot.png"),
            "--ready-check-timeout-sec", "0", "--disable-tqdm",
        ])
        assert rc == 0
        counted = (server.num_requests, server.prompt_tokens, server.completion_tokens)
    out = capsys.readouterr().out
    assert "============ Serving Benchmark Result ============" in out
    result = json.loads((tmp_path / "out.json").read_text())
    # The client's totals equal what the server counted.
    assert (result["completed"], result["total_input_tokens"],
            result["total_output_tokens"]) == counted
    assert result["completed"] == 12 and result["model_id"] == "fake-model"
    assert result["max_concurrent_requests"] <= 4 and result["max_concurrency"] == 4
    assert all(len(itl) == n - 1 for itl, n in zip(result["itls"], result["output_lens"],
                                                   strict=True))
    assert result["mean_itl_ms"] >= 4.0 and result["p50_e2el_ms"] > result["p50_ttft_ms"]
    assert result["request_goodput"] == pytest.approx(result["request_throughput"])
    assert (tmp_path / "plot.png").stat().st_size > 10_000
