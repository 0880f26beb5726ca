"""Engine flags shared by CLI subcommands, named as in `vllm serve`.

Generated from the fields of :class:`EngineArgs` (names, defaults, help text and choices
live there), so a new engine argument is a new flag without touching this file.
"""

from __future__ import annotations

import argparse
import types
from typing import Any, Union, get_args, get_origin

from pagedserve.engine.arg_utils import EngineArgs, EngineArgSpec


def _flag_type(spec: EngineArgSpec) -> type:
    """What a flag's value parses to: the field's type with None dropped (str when mixed)."""
    if spec.flag_type is not None:
        return spec.flag_type
    annotation = spec.annotation
    if get_origin(annotation) in (Union, types.UnionType):
        options = [a for a in get_args(annotation) if a is not type(None)]
        annotation = options[0] if len(options) == 1 else str
    return annotation if annotation in (bool, int, float, str) else str


def _flag_kwargs(spec: EngineArgSpec) -> dict[str, Any]:
    help_text = spec.help
    if spec.default is not None and "default" not in help_text:
        help_text += f" (default: {spec.default})"
    kwargs: dict[str, Any] = {"default": spec.default, "help": help_text, "dest": spec.name}
    flag_type = _flag_type(spec)
    if flag_type is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif flag_type is not str:
        kwargs["type"] = flag_type
    if spec.choices is not None:
        kwargs["choices"] = list(spec.choices)
    if spec.metavar is not None:
        kwargs["metavar"] = spec.metavar
    return kwargs


def add_engine_flags(parser: argparse.ArgumentParser, with_model: bool = True) -> None:
    """One ``--flag-name`` per EngineArgs field (``--model`` only when ``with_model``)."""
    group = parser.add_argument_group("engine")
    for spec in EngineArgs.specs():
        if spec.name == "model" and not with_model:
            continue
        group.add_argument(spec.flag, **_flag_kwargs(spec))


def engine_args_from_flags(args: argparse.Namespace) -> EngineArgs:
    """EngineArgs from parsed flags: every field the namespace has (others keep defaults)."""
    values = {
        spec.name: getattr(args, spec.name)
        for spec in EngineArgs.specs()
        if hasattr(args, spec.name)
    }
    return EngineArgs(**values)


def _quantization_line(model_config, info: str) -> str:  # noqa: ANN001
    """``quantization: int8 (auto: quantized GGUF); kernels linear=... (measured)``."""
    reason = getattr(model_config, "quantization_reason", "")
    line = f"quantization: {model_config.quantization}" + (f" ({reason})" if reason else "")
    return f"{line}; {info}" if info else line


def describe_engine(
    engine_config,  # noqa: ANN001
    kv_cache,  # noqa: ANN001
    load_seconds: float | None = None,
    quantization_info: str | None = None,
) -> str:
    """The start-up banner lines: model, dtype and why, quantization and its kernels, ISA,
    threads, KV capacity.

    ``kv_cache`` is what the engine core allocated once the model was loaded: its
    ``KVCacheConfig``, or the ``EngineCoreReadyInfo`` the core process reported
    (both have ``num_blocks``, null block included, ``block_size`` and
    ``kv_cache_memory_bytes``; the ready info also says which int8 kernels the core
    chose, given as ``quantization_info`` otherwise).
    """
    from pagedserve import platform

    model = engine_config.model_config
    cache = engine_config.cache_config
    num_usable_blocks = kv_cache.num_blocks - 1
    lines = [
        f"model: {model.model} ({model.architecture}) from {model.model_path}",
        f"dtype: {str(model.dtype).removeprefix('torch.')} ({model.dtype_reason}); "
        f"device: {platform.device()}; ISA: {platform.cpu_isa()}; threads: {platform.num_threads()}",
        _quantization_line(model, quantization_info or getattr(kv_cache, "quantization", "")),
        f"KV cache: {num_usable_blocks} blocks x {kv_cache.block_size} tokens = "
        f"{num_usable_blocks * kv_cache.block_size} tokens "
        f"({kv_cache.kv_cache_memory_bytes / 2**20:.0f} MiB); max_model_len: {model.max_model_len}; "
        f"prefix caching: {'on' if cache.enable_prefix_caching else 'off'}",
    ]
    lines.append(_step_budget_line(engine_config.scheduler_config, kv_cache))
    if load_seconds is not None:
        lines.append(f"engine ready in {load_seconds:.1f} s")
    return "\n".join(lines)


def _step_budget_line(scheduler_config, kv_cache) -> str:  # noqa: ANN001
    """``step budget: 200 ms (auto: ...); max_num_batched_tokens: 2048``; the measured
    budget comes with the core process's ready info (offline: the configured value)."""
    target_ms = scheduler_config.max_step_latency_ms
    if target_ms == 0:
        budget = "off"
    else:
        budget = getattr(kv_cache, "step_budget", "") or (
            "auto (measured at start-up)" if target_ms is None else f"{target_ms:g} ms"
        )
    return f"step budget: {budget}; max_num_batched_tokens: {scheduler_config.max_num_batched_tokens}"
