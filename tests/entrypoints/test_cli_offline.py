"""`pagedserve generate` and `pagedserve bench throughput|latency` as a user runs them."""

from __future__ import annotations

import os
import subprocess
import sys

from pagedserve import LLM, SamplingParams

CLI = [sys.executable, "-m", "pagedserve.entrypoints.cli"]


def _run(args: list[str]) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    return subprocess.run(CLI + args, capture_output=True, text=True, timeout=300, env=env)


def test_generate_streams_the_greedy_continuation(tiny_model_dir):
    folder = tiny_model_dir("llama")
    result = _run(["generate", "hello world", "--model", folder, "--max-tokens", "12",
                   "--dtype", "float32", "--kv-cache-memory", "4MiB"])
    assert result.returncode == 0, result.stderr
    llm = LLM(model=folder, dtype="float32", kv_cache_memory="4MiB")
    expected = llm.generate("hello world", SamplingParams(temperature=0.0, max_tokens=12),
                            use_tqdm=False)[0].outputs[0].text
    assert result.stdout == expected + "\n"
    # The banner says what runs where.
    for word in ("model:", "dtype: float32", "KV cache:", "threads:", "tokens"):
        assert word in result.stderr


def test_generate_bad_input_is_a_clear_error(tiny_model_dir):
    result = _run(["generate", "hi", "--model", tiny_model_dir("llama"), "--max-tokens", "0",
                   "--kv-cache-memory", "4MiB"])
    assert result.returncode == 2
    assert "max_tokens must be at least 1" in result.stderr


def test_bench_throughput_prints_vllm_lines(tiny_model_dir):
    result = _run(["bench", "throughput", "--model", tiny_model_dir("qwen3"), "--input-len", "16",
                   "--output-len", "8", "--num-prompts", "6", "--dtype", "float32",
                   "--kv-cache-memory", "8MiB", "--disable-tqdm"])
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("Throughput: ") and "requests/s" in lines[0]
    assert "total tokens/s" in lines[0] and "output tokens/s" in lines[0]
    assert "Total num prompt tokens:  96" in lines
    assert "Total num output tokens:  48" in lines


def test_bench_latency_prints_percentiles(tiny_model_dir):
    result = _run(["bench", "latency", "--model", tiny_model_dir("qwen3"), "--input-len", "8",
                   "--output-len", "4", "--batch-size", "2", "--num-iters", "2",
                   "--num-iters-warmup", "0", "--kv-cache-memory", "8MiB"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Avg latency: ")
    assert "99% percentile latency:" in result.stdout
