"""Frozen engine configuration. Flags / LLM kwargs -> EngineArgs -> EngineConfig.

"auto" values (dtype, max_model_len, KV memory) are resolved before freezing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch

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
    served_model_name: str
    seed: int = 0
    chat_template: str | None = None
    eos_token_ids: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        if self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")

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
    """The paged KV cache."""

    block_size: int = 16
    num_blocks: int = 0  # includes the reserved null block 0
    kv_cache_memory_bytes: int = 0
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 1, got {self.block_size}")
        if self.num_blocks < 2:
            raise ValueError(
                f"the KV cache needs at least 2 blocks (one is the reserved null block), "
                f"got {self.num_blocks}; raise kv_cache_memory"
            )

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1


@dataclass(frozen=True)
class SchedulerConfig:
    """Per-step limits and the scheduling policy."""

    max_num_seqs: int = 128
    max_num_batched_tokens: int = 2048
    max_model_len: int = 32768
    long_prefill_token_threshold: int = 0  # 0: a long prefill may take the whole budget
    policy: str = "fcfs"  # "fcfs" or "priority" (lower value first, as vLLM)
    max_num_queued_requests: int = 0  # 0: unbounded

    def __post_init__(self) -> None:
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
