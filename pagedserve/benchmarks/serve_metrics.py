"""Metrics of `bench serve`: vLLM's calculate_metrics and its "Serving Benchmark Result".

Given what the client measured per request (TTFT, inter-token gaps, latency, token
counts), compute totals, throughputs, goodput and latency statistics exactly as vLLM's
serving benchmark does, and format its report block and result JSON keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

MS = 1000.0
PERCENTILE_METRICS = ("ttft", "tpot", "itl", "e2el")


@dataclass
class RequestFuncOutput:
    """What the client measured for one request (times in seconds, perf_counter)."""

    generated_text: str = ""
    success: bool = False
    latency: float = 0.0
    output_tokens: int = 0
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    prompt_len: int = 0
    start_time: float = 0.0
    error: str = ""


@dataclass
class BenchmarkMetrics:
    """The aggregates of vLLM's serving benchmark (latencies in ms)."""

    completed: int
    failed: int
    total_input: int
    total_output: int
    request_throughput: float
    request_goodput: float
    output_throughput: float
    total_token_throughput: float
    max_output_tokens_per_s: float
    max_concurrent_requests: int
    stats_ms: dict[str, dict[str, Any]]  # metric -> mean/median/std/percentiles
    tokens_per_second: list[float]
    output_lens: list[int]


def parse_goodput(items: list[str] | None) -> dict[str, float]:
    """``["ttft:500", "tpot:50"]`` -> {"ttft": 500.0, "tpot": 50.0} (milliseconds)."""
    result: dict[str, float] = {}
    for item in items or []:
        name, sep, value = item.partition(":")
        if not sep or name not in ("ttft", "tpot", "e2el"):
            raise ValueError(
                f"--goodput takes KEY:VALUE pairs with KEY in ttft, tpot, e2el; got {item!r}")
        try:
            ms = float(value)
        except ValueError as exc:
            raise ValueError(f"--goodput value must be a number of ms, got {item!r}") from exc
        if ms < 0:
            raise ValueError(f"--goodput value must be >= 0, got {item!r}")
        result[name] = ms
    return result


def _timeline(outputs: list[RequestFuncOutput]) -> tuple[list[float], int, float]:
    """Output tokens per 1 s bucket from the first start, peak concurrency, first start time."""
    done = [o for o in outputs if o.success]
    if not done:
        return [], 0, 0.0
    first_start = min(o.start_time for o in done)
    last_end = max(o.start_time + o.latency for o in done)
    num_seconds = int(np.ceil(last_end - first_start)) + 1
    tokens = np.zeros(num_seconds)
    events: list[tuple[float, int]] = []
    for o in done:
        token_times = o.start_time + o.ttft + np.concatenate([[0.0], np.cumsum(o.itl)])
        buckets = (token_times - first_start).astype(int)
        np.add.at(tokens, buckets[(buckets >= 0) & (buckets < num_seconds)], 1)
        events.append((o.start_time, 1))
        events.append((o.start_time + o.latency, -1))
    # Peak number of requests in flight at one instant (ends sort before starts at a tie).
    peak = current = 0
    for _, delta in sorted(events):
        current += delta
        peak = max(peak, current)
    return tokens.tolist(), peak, first_start


def calculate_metrics(
    outputs: list[RequestFuncOutput],
    duration_s: float,
    tokenizer: Any | None,
    selected_percentiles: list[float],
    goodput: dict[str, float] | None = None,
) -> BenchmarkMetrics:
    """vLLM's calculate_metrics: totals, throughputs and latency statistics."""
    output_lens: list[int] = []
    total_input = completed = good = 0
    ttfts: list[float] = []
    tpots: list[float] = []
    all_tpots: list[float] = []
    itls: list[float] = []
    e2els: list[float] = []
    for o in outputs:
        if not o.success:
            output_lens.append(0)
            continue
        output_len = o.output_tokens
        if not output_len:
            output_len = (len(tokenizer.encode(o.generated_text, add_special_tokens=False))
                          if tokenizer is not None else len(o.itl) + 1)
        output_lens.append(output_len)
        total_input += o.prompt_len
        tpot = 0.0
        if output_len > 1:
            tpot = (o.latency - o.ttft) / (output_len - 1)
            tpots.append(tpot)
        all_tpots.append(tpot)  # as vLLM: tpot 0 for goodput when there is one token
        itls.extend(o.itl)
        ttfts.append(o.ttft)
        e2els.append(o.latency)
        completed += 1
    if goodput:
        per_request = {"ttft": ttfts, "tpot": all_tpots, "e2el": e2els}
        names = list(goodput)
        for values in zip(*(per_request[n] for n in names), strict=True):
            if all(v <= goodput[n] / MS for n, v in zip(names, values, strict=True)):
                good += 1
    total_output = sum(output_lens)
    tokens_per_second, max_concurrent, _ = _timeline(outputs)

    def stats(values: list[float]) -> dict[str, Any]:
        arr = np.asarray(values or [0.0], dtype=np.float64) * MS
        return {
            "mean": float(arr.mean()),
            "median": float(np.median(arr)),
            "std": float(arr.std()),
            "percentiles": [(p, float(np.percentile(arr, p))) for p in selected_percentiles],
        }

    duration_s = max(duration_s, 1e-9)
    return BenchmarkMetrics(
        completed=completed,
        failed=len(outputs) - completed,
        total_input=total_input,
        total_output=total_output,
        request_throughput=completed / duration_s,
        request_goodput=good / duration_s,
        output_throughput=total_output / duration_s,
        total_token_throughput=(total_input + total_output) / duration_s,
        max_output_tokens_per_s=max(tokens_per_second, default=0.0),
        max_concurrent_requests=max_concurrent,
        stats_ms={"ttft": stats(ttfts), "tpot": stats(tpots), "itl": stats(itls),
                  "e2el": stats(e2els)},
        tokens_per_second=tokens_per_second,
        output_lens=output_lens,
    )


_METRIC_HEADERS = {
    "ttft": ("TTFT", "Time to First Token"),
    "tpot": ("TPOT", "Time per Output Token (excl. 1st token)"),
    "itl": ("ITL", "Inter-token Latency"),
    "e2el": ("E2EL", "End-to-end Latency"),
}


def format_report(
    metrics: BenchmarkMetrics,
    outputs: list[RequestFuncOutput],
    duration_s: float,
    selected_metrics: list[str],
    request_rate: float = float("inf"),
    max_concurrency: int | None = None,
    goodput: dict[str, float] | None = None,
) -> tuple[str, dict[str, Any]]:
    """vLLM's "Serving Benchmark Result" block and its result dict (same keys)."""
    lines = ["{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=50, c="=")]

    def row(label: str, value: Any, fmt: str = "") -> None:
        lines.append("{:<40} {:<10{fmt}}".format(label, value, fmt=fmt))

    row("Successful requests:", metrics.completed)
    if metrics.failed:
        row("Failed requests:", metrics.failed)
    if max_concurrency is not None:
        row("Maximum request concurrency:", max_concurrency)
    if request_rate != float("inf"):
        row("Request rate configured (RPS):", request_rate, ".2f")
    row("Benchmark duration (s):", duration_s, ".2f")
    row("Total input tokens:", metrics.total_input)
    row("Total generated tokens:", metrics.total_output)
    row("Request throughput (req/s):", metrics.request_throughput, ".2f")
    if goodput:
        row("Request goodput (req/s):", metrics.request_goodput, ".2f")
    row("Output token throughput (tok/s):", metrics.output_throughput, ".2f")
    row("Peak output token throughput (tok/s):", metrics.max_output_tokens_per_s, ".2f")
    row("Peak concurrent requests:", metrics.max_concurrent_requests, ".2f")
    row("Total Token throughput (tok/s):", metrics.total_token_throughput, ".2f")
    result: dict[str, Any] = {
        "duration": duration_s,
        "completed": metrics.completed,
        "failed": metrics.failed,
        "total_input_tokens": metrics.total_input,
        "total_output_tokens": metrics.total_output,
        "request_throughput": metrics.request_throughput,
        "request_goodput": metrics.request_goodput if goodput else None,
        "output_throughput": metrics.output_throughput,
        "total_token_throughput": metrics.total_token_throughput,
        "max_output_tokens_per_s": metrics.max_output_tokens_per_s,
        "max_concurrent_requests": metrics.max_concurrent_requests,
        "input_lens": [o.prompt_len for o in outputs],
        "output_lens": metrics.output_lens,
        "ttfts": [o.ttft for o in outputs],
        "itls": [o.itl for o in outputs],
        "start_times": [o.start_time for o in outputs],
        "generated_texts": [o.generated_text for o in outputs],
        "errors": [o.error for o in outputs],
    }
    for name in ("ttft", "tpot", "itl", "e2el"):
        if name not in selected_metrics:
            continue
        short, header = _METRIC_HEADERS[name]
        stat = metrics.stats_ms[name]
        lines.append("{s:{c}^{n}}".format(s=header, n=50, c="-"))
        row(f"Mean {short} (ms):", stat["mean"], ".2f")
        row(f"Median {short} (ms):", stat["median"], ".2f")
        result[f"mean_{name}_ms"] = stat["mean"]
        result[f"median_{name}_ms"] = stat["median"]
        result[f"std_{name}_ms"] = stat["std"]
        for p, value in stat["percentiles"]:
            p_word = str(int(p)) if int(p) == p else str(p)
            row(f"P{p_word} {short} (ms):", value, ".2f")
            result[f"p{p_word}_{name}_ms"] = value
    lines.append("=" * 50)
    return "\n".join(lines), result
