"""Engine flags shared by CLI subcommands, named as in `vllm serve`."""

from __future__ import annotations

import argparse

from pagedserve.engine.arg_utils import EngineArgs


def add_engine_flags(parser: argparse.ArgumentParser, with_model: bool = True) -> None:
    if with_model:
        parser.add_argument("--model", default=None,
                            help="HF folder, hub id or .gguf file (default: bundled Gemma 3 270M)")
    parser.add_argument("--dtype", default="auto",
                        choices=["auto", "bfloat16", "float32", "float16"])
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--max-num-seqs", type=int, default=128)
    parser.add_argument("--max-num-batched-tokens", type=int, default=None)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--kv-cache-memory", default=None,
                        help="KV cache size: bytes or e.g. 4GiB (default: a share of free memory)")
    parser.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                        default=True)
    parser.add_argument("--scheduling-policy", default="fcfs", choices=["fcfs", "priority"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-threads", type=int, default=None,
                        help="torch threads for the engine (default: all cores)")


def engine_args_from_flags(args: argparse.Namespace) -> EngineArgs:
    return EngineArgs(
        model=args.model,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        block_size=args.block_size,
        kv_cache_memory=args.kv_cache_memory,
        enable_prefix_caching=args.enable_prefix_caching,
        scheduling_policy=args.scheduling_policy,
        seed=args.seed,
        num_threads=args.num_threads,
    )


def describe_engine(engine_config, load_seconds: float | None = None) -> str:  # noqa: ANN001
    """The start-up banner lines: model, dtype and why, ISA, threads, KV capacity."""
    from pagedserve import platform

    model = engine_config.model_config
    cache = engine_config.cache_config
    lines = [
        f"model: {model.model} ({model.architecture}) from {model.model_path}",
        f"dtype: {str(model.dtype).removeprefix('torch.')} ({model.dtype_reason}); "
        f"device: {platform.device()}; ISA: {platform.cpu_isa()}; threads: {platform.num_threads()}",
        f"KV cache: {cache.num_usable_blocks} blocks x {cache.block_size} tokens = "
        f"{cache.num_usable_blocks * cache.block_size} tokens "
        f"({cache.kv_cache_memory_bytes / 2**20:.0f} MiB); max_model_len: {model.max_model_len}; "
        f"prefix caching: {'on' if cache.enable_prefix_caching else 'off'}",
    ]
    if load_seconds is not None:
        lines.append(f"engine ready in {load_seconds:.1f} s")
    return "\n".join(lines)
