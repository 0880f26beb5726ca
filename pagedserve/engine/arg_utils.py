"""EngineArgs: the user-facing knobs (LLM kwargs, CLI flags) resolved into a frozen EngineConfig."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from pagedserve import platform
from pagedserve.config import (
    CacheConfig,
    EngineConfig,
    ModelConfig,
    SchedulerConfig,
    parse_size,
)

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "gemma-3-270m"
# Share of free memory the KV cache takes when kv_cache_memory is not given, and its bounds.
_DEFAULT_KV_SHARE_CPU = 0.2
_DEFAULT_KV_MAX_CPU = 4 << 30
_DEFAULT_KV_SHARE_CUDA = 0.5
_MIN_KV_BYTES = 64 << 20


@dataclass
class EngineArgs:
    """Arguments for the engine, with vLLM's names and defaults where the concept is the same."""

    model: str | None = None
    revision: str | None = None
    served_model_name: str | None = None
    dtype: str = "auto"
    max_model_len: int | None = None
    max_num_seqs: int = 128
    max_num_batched_tokens: int | None = None
    long_prefill_token_threshold: int | None = None
    block_size: int = 16
    kv_cache_memory: int | str | None = None
    enable_prefix_caching: bool = True
    scheduling_policy: str = "fcfs"
    max_num_queued_requests: int = 0
    seed: int = 0
    chat_template: str | None = None
    num_threads: int | None = None

    def create_engine_config(self) -> EngineConfig:
        """Resolve the model and every "auto" value, then freeze."""
        from pagedserve.models.resolve import resolve_model
        from pagedserve.worker.kv_cache import kv_cache_bytes_per_block

        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        resolved = resolve_model(self.model, revision=self.revision)
        dtype, dtype_reason = platform.resolve_dtype(self.dtype)
        hf_config = resolved.hf_config
        model_max_len = int(
            getattr(hf_config, "max_position_embeddings", 0) or 2048
        )
        if self.max_model_len is None:
            max_model_len = model_max_len
        else:
            if self.max_model_len < 2:
                raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
            if self.max_model_len > model_max_len:
                raise ValueError(
                    f"max_model_len={self.max_model_len} exceeds the model's "
                    f"max_position_embeddings={model_max_len}"
                )
            max_model_len = self.max_model_len
        served_name = self.served_model_name or (
            self.model if self.model is not None else DEFAULT_MODEL_NAME
        )
        model_config = ModelConfig(
            model=self.model if self.model is not None else DEFAULT_MODEL_NAME,
            model_path=resolved.model_path,
            tokenizer_path=resolved.tokenizer_path,
            hf_config=hf_config,
            architecture=resolved.architecture,
            dtype=dtype,
            dtype_reason=dtype_reason,
            max_model_len=max_model_len,
            served_model_name=served_name,
            seed=self.seed,
            chat_template=self.chat_template or resolved.chat_template,
            eos_token_ids=frozenset(resolved.eos_token_ids),
        )
        bytes_per_block = kv_cache_bytes_per_block(model_config, self.block_size, dtype)
        kv_bytes = self._resolve_kv_bytes(model_config, bytes_per_block, dtype)
        num_blocks = kv_bytes // bytes_per_block
        if num_blocks < 2:
            raise ValueError(
                f"kv_cache_memory={kv_bytes} bytes holds {num_blocks} blocks of "
                f"{bytes_per_block} bytes; at least 2 are needed"
            )
        cache_config = CacheConfig(
            block_size=self.block_size,
            num_blocks=int(num_blocks),
            kv_cache_memory_bytes=int(num_blocks * bytes_per_block),
            enable_prefix_caching=self.enable_prefix_caching,
        )
        max_batched = self.max_num_batched_tokens
        if max_batched is None:
            max_batched = 2048 if not platform.is_cuda() else 8192
        threshold = self.long_prefill_token_threshold
        if threshold is None:
            # Let short requests through while a long prompt prefills (vLLM: 4% of context).
            threshold = 0
        scheduler_config = SchedulerConfig(
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=max_batched,
            max_model_len=max_model_len,
            long_prefill_token_threshold=threshold,
            policy=self.scheduling_policy,
            max_num_queued_requests=self.max_num_queued_requests,
        )
        return EngineConfig(
            model_config=model_config,
            cache_config=cache_config,
            scheduler_config=scheduler_config,
            num_threads=self.num_threads or 0,
        )

    def _resolve_kv_bytes(
        self, model_config: ModelConfig, bytes_per_block: int, dtype: torch.dtype
    ) -> int:
        if self.kv_cache_memory is not None:
            return parse_size(self.kv_cache_memory)
        available = platform.available_memory_bytes()
        if platform.is_cuda():
            share = int(available * _DEFAULT_KV_SHARE_CUDA)
        else:
            share = min(int(available * _DEFAULT_KV_SHARE_CPU), _DEFAULT_KV_MAX_CPU)
        # No point reserving more than max_num_seqs full-length sequences can use.
        blocks_needed = self.max_num_seqs * (
            -(-model_config.max_model_len // self.block_size)
        ) + 1
        return max(min(share, blocks_needed * bytes_per_block), _MIN_KV_BYTES)
