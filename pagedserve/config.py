"""Frozen engine configuration. Flags / LLM kwargs -> EngineArgs -> EngineConfig.

"auto" values (dtype, max_model_len) are resolved before freezing. The KV cache's
size in blocks is not configuration: the engine core decides it once the model is
loaded, where the memory is, and reports it as a :class:`KVCacheConfig`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch

# Resolved quantization methods (EngineArgs.quantization also takes "auto").
QUANTIZATION_METHODS = ("none", "int8")

_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "ki": 1024, "kib": 1024,
    "m": 1000**2, "mb": 1000**2, "mi": 1024**2, "mib": 1024**2,
    "g": 1000**3, "gb": 1000**3, "gi": 1024**3, "gib": 1024**3,
    "t": 1000**4, "tb": 1000**4, "ti": 1024**4, "tib": 1024**4,
}


def parse_size(value: int | str) -> int:
    """Parse a byte count: an int, or a string such as "4GiB", "512MB", "1e9"."""
    if isinstance(value, int):
        if value <= 0:
            raise ValueError(f"memory size must be positive, got {value}")
        return value
    text = str(value).strip()
    try:
        return parse_size(int(float(text)))
    except ValueError:
        pass
    match = _SIZE_RE.match(text)
    if not match:
        raise ValueError(f"cannot parse memory size {value!r}; use bytes or e.g. '4GiB', '512MB'")
    number, unit = match.groups()
    multiplier = _UNITS.get((unit or "").lower())
    if multiplier is None:
        raise ValueError(f"unknown unit in memory size {value!r}")
    return parse_size(int(float(number) * multiplier))


@dataclass(frozen=True)
class ModelConfig:
    """The model to serve, resolved to local files."""

    model: str  # as the user named it (path, hub id, or the default model's name)
    model_path: str  # local folder or .gguf file holding the weights
    tokenizer_path: str  # local folder with tokenizer files (converted and cached for GGUF)
    hf_config: Any  # transformers PretrainedConfig of the text model
    architecture: str  # e.g. "Gemma3ForCausalLM"
    dtype: torch.dtype
    dtype_reason: str
    max_model_len: int
    seed: int = 0
    eos_token_ids: frozenset[int] = frozenset()
    # Resolved --quantization: "none" or "int8" (never "auto"), and why.
    quantization: str = "none"
    quantization_reason: str = ""

    def __post_init__(self) -> None:
        if self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")
        if self.quantization not in QUANTIZATION_METHODS:
            raise ValueError(
                f"quantization must be one of {', '.join(QUANTIZATION_METHODS)} once "
                f"resolved, got {self.quantization!r}"
            )

    @property
    def num_layers(self) -> int:
        return int(self.hf_config.num_hidden_layers)

    @property
    def num_kv_heads(self) -> int:
        return int(
            getattr(self.hf_config, "num_key_value_heads", None)
            or self.hf_config.num_attention_heads
        )

    @property
    def head_dim(self) -> int:
        head_dim = getattr(self.hf_config, "head_dim", None)
        if head_dim:
            return int(head_dim)
        return int(self.hf_config.hidden_size // self.hf_config.num_attention_heads)

    @property
    def vocab_size(self) -> int:
        return int(self.hf_config.vocab_size)


@dataclass(frozen=True)
class CacheConfig:
    """The KV cache budget the user asked for.

    The number of blocks is not known here: the engine core decides it after loading
    the model, from the attention backend's cache layout and the memory free then
    (see :class:`KVCacheConfig`).
    """

    block_size: int = 16
    # Bytes for the KV cache; None: a share of the memory free once the model is loaded.
    kv_cache_memory_bytes: int | None = None
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 1, got {self.block_size}")
        if self.kv_cache_memory_bytes is not None and self.kv_cache_memory_bytes <= 0:
            raise ValueError(
                f"kv_cache_memory must be positive, got {self.kv_cache_memory_bytes} bytes"
            )


@dataclass(frozen=True, slots=True)
class KVCacheConfig:
    """The KV cache as the engine core allocated it (vLLM's ``KVCacheConfig``).

    Made by the model runner after the model is loaded; the scheduler's block pool
    and the start-up report take their numbers from here.
    """

    num_blocks: int  # includes the reserved null block 0
    block_size: int  # tokens per block
    bytes_per_block: int  # one block across all layers (K and V)
    kv_cache_memory_bytes: int  # num_blocks * bytes_per_block

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.bytes_per_block < 1:
            raise ValueError(
                f"block_size and bytes_per_block must be >= 1, got {self.block_size} "
                f"and {self.bytes_per_block}"
            )
        if self.kv_cache_memory_bytes != self.num_blocks * self.bytes_per_block:
            raise ValueError(
                f"kv_cache_memory_bytes={self.kv_cache_memory_bytes} is not num_blocks "
                f"({self.num_blocks}) x bytes_per_block ({self.bytes_per_block})"
            )

    @property
    def num_usable_blocks(self) -> int:
        """Blocks requests can hold: all but the null block."""
        return self.num_blocks - 1

    @property
    def num_tokens(self) -> int:
        """KV capacity in tokens."""
        return self.num_usable_blocks * self.block_size


@dataclass(frozen=True)
class SchedulerConfig:
    """Per-step limits and the scheduling policy."""

    max_num_seqs: int = 128
    # No default here: EngineArgs._resolve_max_num_batched_tokens is its one home.
    max_num_batched_tokens: int = field(kw_only=True)
    max_model_len: int = 32768
    long_prefill_token_threshold: int = 0  # 0: a long prefill may take the whole budget
    policy: str = "fcfs"  # "fcfs" or "priority" (lower value first, as vLLM)
    max_num_queued_requests: int = 0  # 0: unbounded
    # Target step time in ms that sizes each step's prefill chunks (core/step_cost.py):
    # None: auto, from a start-up measurement; 0: off (chunks up to max_num_batched_tokens).
    max_step_latency_ms: float | None = None

    def __post_init__(self) -> None:
        if self.max_step_latency_ms is not None and not (
            math.isfinite(self.max_step_latency_ms) and self.max_step_latency_ms >= 0
        ):
            raise ValueError(
                f"max_step_latency_ms must be a number of ms >= 0 (0: off), "
                f"got {self.max_step_latency_ms}"
            )
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}"
            )
        if self.policy not in ("fcfs", "priority"):
            raise ValueError(f"scheduling_policy must be 'fcfs' or 'priority', got {self.policy!r}")
        if self.long_prefill_token_threshold < 0:
            raise ValueError("long_prefill_token_threshold must be >= 0")


@dataclass(frozen=True)
class EngineConfig:
    """Everything the engine core needs, resolved and frozen."""

    model_config: ModelConfig
    cache_config: CacheConfig
    scheduler_config: SchedulerConfig
    num_threads: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
