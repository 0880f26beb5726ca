"""`pagedserve bench throughput|latency|serve`, printing vLLM's result lines."""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from pagedserve.entrypoints.engine_flags import (
    add_engine_flags,
    describe_engine,
    engine_args_from_flags,
)


def _make_llm(args: argparse.Namespace):  # noqa: ANN202
    from pagedserve.engine.llm import LLM

    start = time.perf_counter()
    llm = LLM.from_engine_args(engine_args_from_flags(args))
    startup = time.perf_counter() - start
    kv_cache_config = llm.llm_engine.kv_cache_config
    print(describe_engine(llm.llm_engine.engine_config, kv_cache_config, startup,
                          llm.llm_engine.quantization_info), file=sys.stderr)
    return llm, startup


def bench_throughput(args: argparse.Namespace) -> int:
    from pagedserve.benchmarks.datasets import random_token_prompts
    from pagedserve.sampling_params import SamplingParams

    llm, startup = _make_llm(args)
    model_config = llm.llm_engine.model_config
    prompts = random_token_prompts(
        args.num_prompts, args.input_len, model_config.vocab_size, args.seed
    )
    params = SamplingParams(
        temperature=0.0, max_tokens=args.output_len, ignore_eos=True
    )
    inputs = [{"prompt_token_ids": p} for p in prompts]
    if args.warmup:
        llm.generate(inputs[:2], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
    start = time.perf_counter()
    outputs = llm.generate(inputs, params, use_tqdm=not args.disable_tqdm)
    elapsed = time.perf_counter() - start
    prompt_tokens = sum(len(o.prompt_token_ids) for o in outputs)
    output_tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    result = {
        "elapsed_time": elapsed,
        "num_requests": len(outputs),
        "total_num_tokens": prompt_tokens + output_tokens,
        "requests_per_second": len(outputs) / elapsed,
        "tokens_per_second": (prompt_tokens + output_tokens) / elapsed,
        "output_tokens_per_second": output_tokens / elapsed,
        "startup_seconds": startup,
    }
    print(
        f"Throughput: {result['requests_per_second']:.2f} requests/s, "
        f"{result['tokens_per_second']:.2f} total tokens/s, "
        f"{result['output_tokens_per_second']:.2f} output tokens/s"
    )
    print(f"Total num prompt tokens:  {prompt_tokens}")
    print(f"Total num output tokens:  {output_tokens}")
    if args.compare_hf:
        del llm
        result["hf_baseline"] = _compare_hf(args, model_config, prompts, result)
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


def _compare_hf(args, model_config, prompts, result) -> list[dict]:  # noqa: ANN001
    from pagedserve.benchmarks.hf_baseline import load_hf_model, run_hf_generate

    model = load_hf_model(model_config.model_path, model_config.dtype)
    rows = []
    for batch_size in [int(b) for b in args.compare_hf.split(",")]:
        num = min(len(prompts), batch_size * args.hf_num_batches)
        base = run_hf_generate(model, prompts[:num], args.output_len, batch_size)
        ratio = result["output_tokens_per_second"] / base.output_tokens_per_s
        print(
            f"transformers generate (static batch {batch_size}, {num} prompts): "
            f"{base.output_tokens_per_s:.2f} output tokens/s; pagedserve is {ratio:.2f}x"
        )
        rows.append({"batch_size": batch_size, "num_prompts": num,
                     "output_tokens_per_second": base.output_tokens_per_s, "ratio": ratio})
    return rows


def bench_latency(args: argparse.Namespace) -> int:
    from pagedserve.benchmarks.datasets import random_token_prompts
    from pagedserve.sampling_params import RequestOutputKind, SamplingParams

    llm, _ = _make_llm(args)
    engine = llm.llm_engine
    vocab_size = engine.model_config.vocab_size
    params = SamplingParams(
        temperature=0.0, max_tokens=args.output_len, ignore_eos=True,
        output_kind=RequestOutputKind.DELTA,
    )

    def run_once(iteration: int) -> tuple[float, float]:
        # Fresh prompts each iteration: a prefix-cache hit would flatter the TTFT.
        prompts = random_token_prompts(
            args.batch_size, args.input_len, vocab_size, args.seed + iteration
        )
        for i, prompt in enumerate(prompts):
            engine.add_request(f"lat-{time.monotonic_ns()}-{i}", {"prompt_token_ids": prompt},
                               params)
        start = time.perf_counter()
        first = None
        while engine.has_unfinished_requests():
            for out in engine.step():
                if first is None and any(c.token_ids for c in out.outputs):
                    first = time.perf_counter()
        end = time.perf_counter()
        return end - start, (first or end) - start

    for iteration in range(args.num_iters_warmup):
        run_once(args.num_iters + iteration)
    latencies, ttfts = [], []
    for iteration in range(args.num_iters):
        latency, ttft = run_once(iteration)
        latencies.append(latency)
        ttfts.append(ttft)
    lat = np.array(latencies)
    print(f"Avg latency: {lat.mean():.6f} seconds")
    for pct in (10, 25, 50, 75, 90, 99):
        print(f"{pct}% percentile latency: {np.percentile(lat, pct):.6f} seconds")
    decode = (args.output_len - 1) / np.maximum(lat - np.array(ttfts), 1e-9)
    print(f"Avg time to first token: {np.mean(ttfts) * 1000:.1f} ms")
    print(f"Avg decode: {decode.mean() * args.batch_size:.2f} output tokens/s "
          f"({decode.mean():.2f} per request)")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({"avg_latency": float(lat.mean()), "latencies": latencies,
                       "ttft": ttfts}, f, indent=2)
    return 0


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="benchmarks (vLLM-shaped output)")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)

    thr = bench_sub.add_parser("throughput", help="offline throughput on random prompts")
    thr.add_argument("--input-len", type=int, default=256)
    thr.add_argument("--output-len", type=int, default=128)
    thr.add_argument("--num-prompts", type=int, default=64)
    thr.add_argument("--output-json", default=None)
    thr.add_argument("--disable-tqdm", action="store_true")
    thr.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True)
    thr.add_argument("--compare-hf", default=None, metavar="BATCH_SIZES",
                     help="also run transformers' generate with these static batch sizes, e.g. 16,1")
    thr.add_argument("--hf-num-batches", type=int, default=1,
                     help="static batches to run per baseline batch size")
    add_engine_flags(thr)
    thr.set_defaults(func=bench_throughput)

    lat = bench_sub.add_parser("latency", help="latency of one batch, end to end")
    lat.add_argument("--input-len", type=int, default=32)
    lat.add_argument("--output-len", type=int, default=128)
    lat.add_argument("--batch-size", type=int, default=8)
    lat.add_argument("--num-iters-warmup", type=int, default=1)
    lat.add_argument("--num-iters", type=int, default=3)
    lat.add_argument("--output-json", default=None)
    add_engine_flags(lat)
    lat.set_defaults(func=bench_latency)

    from pagedserve.benchmarks.serve import add_serve_bench_parser

    add_serve_bench_parser(bench_sub)
