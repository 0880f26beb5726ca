"""`pagedserve bench serve`: drive an OpenAI-compatible server as vLLM's `bench serve` does.

Streams every request (httpx), sends them at ``--request-rate`` (Poisson arrivals, or a
gamma process with ``--burstiness``), at most ``--max-concurrency`` at a time, and prints
vLLM's "Serving Benchmark Result" block; ``--save-result`` writes the same JSON keys.
Works against any OpenAI-compatible server (ours, vLLM, ...).

Output tokens are what the server reports in ``usage`` (``stream_options.include_usage``)
or else the generated text re-tokenized; input tokens likewise are the server's
``usage.prompt_tokens`` where it reports them (e.g. counting a BOS token), else the
dataset's prompt length.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np

from pagedserve.benchmarks.serve_datasets import DATASET_NAMES, SampleRequest
from pagedserve.benchmarks.serve_metrics import (
    PERCENTILE_METRICS,
    RequestFuncOutput,
    calculate_metrics,
    format_report,
    parse_goodput,
)

logger = logging.getLogger(__name__)

HTTP_TIMEOUT_S = 6 * 60 * 60
BACKENDS = {"openai": "/v1/completions", "vllm": "/v1/completions",
            "pagedserve": "/v1/completions", "openai-chat": "/v1/chat/completions"}


@dataclass
class RequestFuncInput:
    """One request as the client sends it."""

    prompt: str
    api_url: str
    prompt_len: int
    output_len: int
    model: str
    chat: bool = False
    ignore_eos: bool = False
    extra_body: dict[str, Any] | None = None


async def request_openai(
    client: Any, request: RequestFuncInput, api_key: str | None = None
) -> RequestFuncOutput:
    """One streamed /v1/completions or /v1/chat/completions request."""
    payload: dict[str, Any] = {
        "model": request.model,
        "temperature": 0.0,
        "max_tokens": request.output_len,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if request.chat:
        payload["messages"] = [{"role": "user", "content": request.prompt}]
        payload["max_completion_tokens"] = request.output_len
    else:
        payload["prompt"] = request.prompt
    if request.ignore_eos:
        payload["ignore_eos"] = True
    if request.extra_body:
        payload.update(request.extra_body)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    output = RequestFuncOutput(prompt_len=request.prompt_len)
    generated: list[str] = []
    start = time.perf_counter()
    output.start_time = start
    most_recent = start
    got_first = False
    try:
        async with client.stream("POST", request.api_url, json=payload,
                                 headers=headers) as response:
            if response.status_code != 200:
                body = (await response.aread()).decode(errors="replace")
                output.error = f"HTTP {response.status_code}: {body[:500]}"
                return output
            async for line in response.aiter_lines():
                line = line.strip()
                if not line.startswith("data:"):
                    continue
                data_text = line[5:].strip()
                if data_text == "[DONE]":
                    continue
                data = json.loads(data_text)
                usage = data.get("usage")
                if usage:
                    output.output_tokens = int(usage.get("completion_tokens") or 0)
                    if usage.get("prompt_tokens"):
                        output.prompt_len = int(usage["prompt_tokens"])
                choices = data.get("choices")
                if not choices:
                    continue
                choice = choices[0]
                if request.chat:
                    delta = choice.get("delta") or {}
                    text = delta.get("content")
                    if not text and choice.get("finish_reason") is None:
                        continue  # the role announcement (or an empty delta) carries no text
                else:
                    text = choice.get("text")
                now = time.perf_counter()
                if not got_first:
                    got_first = True
                    output.ttft = now - start
                else:
                    output.itl.append(now - most_recent)
                most_recent = now
                generated.append(text or "")
        output.generated_text = "".join(generated)
        if got_first:
            output.success = True
            output.latency = most_recent - start
        else:
            output.error = ("Never received a valid chunk to calculate TTFT. "
                            "This response will be marked as failed!")
    except Exception as exc:  # network errors become failed requests, as in vLLM
        output.success = False
        output.error = f"{type(exc).__name__}: {exc}"
    return output


# --------------------------------------------------------------------------- arrivals
async def get_request(
    requests: list[SampleRequest], request_rate: float, burstiness: float = 1.0,
    rng: np.random.Generator | None = None,
) -> AsyncIterator[SampleRequest]:
    """Yield requests at ``request_rate`` req/s: gamma-distributed gaps (shape=burstiness).

    burstiness 1 is a Poisson process; lower is burstier, higher more uniform.
    """
    if burstiness <= 0:
        raise ValueError(f"--burstiness must be > 0, got {burstiness}")
    rng = rng or np.random.default_rng()
    theta = 1.0 / (request_rate * burstiness) if request_rate != float("inf") else 0.0
    for request in requests:
        yield request
        if request_rate == float("inf"):
            continue
        await asyncio.sleep(float(rng.gamma(shape=burstiness, scale=theta)))


# --------------------------------------------------------------------------- driver
async def benchmark(
    requests: list[SampleRequest],
    api_url: str,
    model: str,
    chat: bool = False,
    request_rate: float = float("inf"),
    burstiness: float = 1.0,
    max_concurrency: int | None = None,
    ignore_eos: bool = False,
    extra_body: dict[str, Any] | None = None,
    api_key: str | None = None,
    disable_tqdm: bool = False,
    ready_check_timeout_s: float = 0.0,
    seed: int = 0,
) -> tuple[list[RequestFuncOutput], float]:
    """Send all requests; returns the per-request outputs and the benchmark duration."""
    import httpx

    limit = max_concurrency or max(1, len(requests))
    limits = httpx.Limits(max_connections=limit, max_keepalive_connections=limit)
    timeout = httpx.Timeout(HTTP_TIMEOUT_S)

    def make_input(sample: SampleRequest) -> RequestFuncInput:
        return RequestFuncInput(sample.prompt, api_url, sample.prompt_len,
                                sample.expected_output_len, model, chat, ignore_eos, extra_body)

    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        if ready_check_timeout_s > 0 and requests:
            print("Starting initial single prompt test run...", file=sys.stderr)
            deadline = time.monotonic() + ready_check_timeout_s
            while True:
                test = await request_openai(client, make_input(requests[0]), api_key)
                if test.success:
                    break
                if time.monotonic() > deadline:
                    raise ValueError(
                        f"Initial test run failed - Please make sure benchmark arguments are "
                        f"correctly specified. Error: {test.error}")
                await asyncio.sleep(1.0)
            print("Initial test run completed. Starting main benchmark run...", file=sys.stderr)

        print(f"Traffic request rate: {request_rate}", file=sys.stderr)
        print(f"Burstiness factor: {burstiness} "
              f"({'Poisson process' if burstiness == 1.0 else 'Gamma distribution'})",
              file=sys.stderr)
        print(f"Maximum request concurrency: {max_concurrency}", file=sys.stderr)
        progress = None
        if not disable_tqdm:
            from tqdm import tqdm

            progress = tqdm(total=len(requests))
        semaphore = asyncio.Semaphore(max_concurrency) if max_concurrency else None

        async def run_one(sample: SampleRequest) -> RequestFuncOutput:
            if semaphore is None:
                result = await request_openai(client, make_input(sample), api_key)
            else:
                async with semaphore:
                    result = await request_openai(client, make_input(sample), api_key)
            if progress is not None:
                progress.update(1)
            return result

        start = time.perf_counter()
        tasks = []
        rng = np.random.default_rng(seed)
        async for sample in get_request(requests, request_rate, burstiness, rng):
            tasks.append(asyncio.create_task(run_one(sample)))
        outputs = list(await asyncio.gather(*tasks))
        duration = time.perf_counter() - start
        if progress is not None:
            progress.close()
    return outputs, duration


def _resolve_model(base_url: str, api_key: str | None) -> str:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = httpx.get(base_url.rstrip("/") + "/v1/models", headers=headers, timeout=30)
        response.raise_for_status()
        return str(response.json()["data"][0]["id"])
    except Exception as exc:
        raise ValueError(
            f"--model not given and {base_url}/v1/models did not name one: {exc}") from exc


def run_bench_serve(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark for parsed flags; prints the report, returns the result JSON."""
    from pagedserve.benchmarks.serve_datasets import get_bench_tokenizer, get_samples

    base_url = args.base_url or f"http://{args.host}:{args.port}"
    endpoint = args.endpoint or BACKENDS[args.backend]
    api_url = base_url.rstrip("/") + endpoint
    chat = args.backend == "openai-chat" or endpoint.endswith("/chat/completions")
    api_key = args.api_key or os.environ.get("OPENAI_API_KEY")
    model = args.model or _resolve_model(base_url, api_key)
    tokenizer_id = args.tokenizer or args.model
    tokenizer = get_bench_tokenizer(tokenizer_id)
    goodput = parse_goodput(args.goodput)
    selected_metrics = [m.strip() for m in args.percentile_metrics.split(",") if m.strip()]
    for name in selected_metrics:
        if name not in PERCENTILE_METRICS:
            raise ValueError(f"--percentile-metrics takes {PERCENTILE_METRICS}, got {name!r}")
    selected_percentiles = [float(p) for p in args.metric_percentiles.split(",")]
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise ValueError("--max-concurrency must be >= 1")
    if args.request_rate <= 0:
        raise ValueError("--request-rate must be > 0 (inf: all at once)")
    extra_body = {}
    for key in ("top_p", "top_k", "min_p", "temperature"):
        value = getattr(args, key, None)
        if value is not None:
            extra_body[key] = value
    requests = get_samples(args, tokenizer)
    outputs, duration = asyncio.run(benchmark(
        requests, api_url, model, chat, args.request_rate, args.burstiness,
        args.max_concurrency, args.ignore_eos, extra_body or None, api_key,
        args.disable_tqdm, args.ready_check_timeout_sec, args.seed,
    ))
    metrics = calculate_metrics(outputs, duration, tokenizer, selected_percentiles, goodput)
    report, result = format_report(metrics, outputs, duration, selected_metrics,
                                   args.request_rate, args.max_concurrency, goodput)
    print(report)
    failures = [o.error for o in outputs if not o.success]
    if failures:
        logger.warning("%d requests failed; first error: %s", len(failures), failures[0])
    if args.plot:
        from pagedserve.benchmarks.plots import plot_serving_result

        plot_serving_result(result, metrics.tokens_per_second, args.plot)
        print(f"plot written to {args.plot}", file=sys.stderr)
    result_json: dict[str, Any] = {
        "date": datetime.now().strftime("%Y%m%d-%H%M%S"),
        "backend": args.backend,
        "endpoint_type": args.backend,
        "label": args.label,
        "model_id": model,
        "tokenizer_id": tokenizer_id,
        "num_prompts": args.num_prompts,
        "request_rate": args.request_rate if args.request_rate != float("inf") else "inf",
        "burstiness": args.burstiness,
        "max_concurrency": args.max_concurrency,
        **_parse_metadata(args.metadata),
        **result,
    }
    if not args.save_detailed:
        for key in ("input_lens", "output_lens", "ttfts", "itls", "start_times",
                    "generated_texts", "errors"):
            result_json.pop(key, None)
    if args.save_result or args.result_filename:
        concurrency = f"-concurrency{args.max_concurrency}" if args.max_concurrency else ""
        file_name = args.result_filename or (
            f"{args.label or args.backend}-{args.request_rate}qps{concurrency}-"
            f"{model.split('/')[-1]}-{result_json['date']}.json")
        if args.result_dir:
            os.makedirs(args.result_dir, exist_ok=True)
            file_name = os.path.join(args.result_dir, file_name)
        with open(file_name, "w") as f:
            json.dump(result_json, f, indent=2)
        print(f"results written to {file_name}", file=sys.stderr)
    result_json["_outputs"] = outputs
    return result_json


def _parse_metadata(items: list[str] | None) -> dict[str, str]:
    metadata = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--metadata takes KEY=VALUE pairs, got {item!r}")
        metadata[key] = value
    return metadata


def bench_serve(args: argparse.Namespace) -> int:
    result = run_bench_serve(args)
    return 0 if result["completed"] else 1


def add_serve_bench_parser(bench_sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `pagedserve bench serve` with vLLM's flags."""
    p = bench_sub.add_parser("serve", help="benchmark an OpenAI-compatible server online")
    p.add_argument("--backend", default="openai", choices=sorted(BACKENDS))
    p.add_argument("--base-url", default=None, help="server URL (default http://HOST:PORT)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--endpoint", default=None,
                   help="API path (default /v1/completions; /v1/chat/completions for chat)")
    p.add_argument("--model", default=None, help="model name (default: the server's first)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer folder / .gguf / hub id (default: --model or the default model)")
    p.add_argument("--api-key", default=None, help="bearer token (default: $OPENAI_API_KEY)")
    p.add_argument("--dataset-name", default="random", choices=DATASET_NAMES)
    p.add_argument("--dataset-path", default=None, help="ShareGPT JSON or custom JSONL file")
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--request-rate", type=float, default=float("inf"),
                   help="requests/s (Poisson or gamma arrivals); inf sends all at once")
    p.add_argument("--burstiness", type=float, default=1.0,
                   help="gamma shape of inter-arrival times: 1 Poisson, <1 burstier")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--percentile-metrics", default="ttft,tpot,itl",
                   help="comma-separated of ttft,tpot,itl,e2el")
    p.add_argument("--metric-percentiles", default="99", help="comma-separated, e.g. 25,50,99")
    p.add_argument("--goodput", nargs="+", default=None, metavar="KEY:MS",
                   help="SLOs for goodput, e.g. ttft:500 tpot:50 (e2el also)")
    p.add_argument("--save-result", action="store_true")
    p.add_argument("--save-detailed", action="store_true",
                   help="keep per-request lists (ttfts, itls, texts, errors) in the JSON")
    p.add_argument("--result-dir", default=None)
    p.add_argument("--result-filename", default=None)
    p.add_argument("--label", default=None)
    p.add_argument("--metadata", nargs="*", default=None, metavar="KEY=VALUE")
    p.add_argument("--disable-tqdm", action="store_true")
    p.add_argument("--ready-check-timeout-sec", type=float, default=600,
                   help="retry a first test request this long before starting (0: skip it)")
    p.add_argument("--plot", default=None, metavar="FILE.png",
                   help="draw TTFT/ITL distributions and output throughput over time")
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--min-p", type=float, default=None)
    g = p.add_argument_group("random dataset")
    g.add_argument("--random-input-len", type=int, default=1024)
    g.add_argument("--random-output-len", type=int, default=128)
    g.add_argument("--random-range-ratio", type=float, default=0.0)
    g.add_argument("--random-prefix-len", type=int, default=0)
    g = p.add_argument_group("sharegpt dataset")
    g.add_argument("--sharegpt-output-len", type=int, default=None)
    g = p.add_argument_group("prefix-repetition dataset")
    g.add_argument("--prefix-repetition-prefix-len", type=int, default=256)
    g.add_argument("--prefix-repetition-suffix-len", type=int, default=256)
    g.add_argument("--prefix-repetition-num-prefixes", type=int, default=10)
    g.add_argument("--prefix-repetition-output-len", type=int, default=128)
    g = p.add_argument_group("custom dataset")
    g.add_argument("--custom-output-len", type=int, default=256)
    g.add_argument("--custom-skip-chat-template", action="store_true")
    p.set_defaults(func=bench_serve)
    return p
