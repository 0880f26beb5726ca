"""The `pagedserve` command: generate, bench, serve."""

from __future__ import annotations

import argparse
import logging
import sys
import time

from pagedserve.entrypoints.engine_flags import (
    add_engine_flags,
    describe_engine,
    engine_args_from_flags,
)


def _generate(args: argparse.Namespace) -> int:
    from pagedserve.engine.llm_engine import LLMEngine
    from pagedserve.sampling_params import RequestOutputKind, SamplingParams

    start = time.perf_counter()
    engine = LLMEngine.from_engine_args(engine_args_from_flags(args))
    kv_cache_config = engine.kv_cache_config
    print(describe_engine(engine.engine_config, kv_cache_config, time.perf_counter() - start,
                          engine.quantization_info), file=sys.stderr)
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        output_kind=RequestOutputKind.DELTA,
    )
    engine.add_request("generate-0", args.prompt, params)
    sys.stdout.write(args.prompt if args.echo else "")
    sys.stdout.flush()
    first_token_time = None
    num_tokens = 0
    request_start = time.perf_counter()
    finish_reason = None
    while engine.has_unfinished_requests():
        for output in engine.step():
            for completion in output.outputs:
                if completion.token_ids and first_token_time is None:
                    first_token_time = time.perf_counter()
                num_tokens += len(completion.token_ids)
                sys.stdout.write(completion.text)
                sys.stdout.flush()
                finish_reason = completion.finish_reason or finish_reason
    end = time.perf_counter()
    sys.stdout.write("\n")
    ttft = (first_token_time or end) - request_start
    decode_rate = (num_tokens - 1) / (end - first_token_time) if first_token_time and num_tokens > 1 else 0.0
    print(
        f"[{num_tokens} tokens, finish_reason={finish_reason}, TTFT {ttft * 1000:.0f} ms, "
        f"decode {decode_rate:.1f} tok/s]",
        file=sys.stderr,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pagedserve", description=__doc__)
    parser.add_argument("--log-level", default="WARNING")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="stream a continuation of PROMPT to the terminal")
    gen.add_argument("prompt")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=-1)
    gen.add_argument("--echo", action="store_true", help="print the prompt before the output")
    add_engine_flags(gen)
    gen.set_defaults(func=_generate)

    from pagedserve.benchmarks.cli import add_bench_parser

    add_bench_parser(sub)

    from pagedserve.entrypoints.openai.cli_args import add_serve_parser

    add_serve_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.WARNING),
        format="%(levelname)s %(asctime)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
