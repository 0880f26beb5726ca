"""Paged KV cache sizing and allocation."""

from __future__ import annotations

import logging

import torch

from pagedserve.config import CacheConfig, ModelConfig

logger = logging.getLogger(__name__)


def kv_cache_shape(model_config: ModelConfig, num_blocks: int, block_size: int) -> tuple[int, ...]:
    """Shape of one layer's cache: [2 (K, V), num_blocks, block_size, num_kv_heads, head_dim]."""
    return (2, num_blocks, block_size, model_config.num_kv_heads, model_config.head_dim)


def kv_cache_bytes_per_block(model_config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one block takes across all layers (K and V)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return (
        2
        * model_config.num_layers
        * block_size
        * model_config.num_kv_heads
        * model_config.head_dim
        * itemsize
    )


def allocate_kv_caches(
    model_config: ModelConfig,
    cache_config: CacheConfig,
    dtype: torch.dtype,
    device: torch.device,
) -> list[torch.Tensor]:
    """One zeroed cache tensor per layer, shaped as ``kv_cache_shape``."""
    shape = kv_cache_shape(model_config, cache_config.num_blocks, cache_config.block_size)
    caches = [
        torch.zeros(shape, dtype=dtype, device=device) for _ in range(model_config.num_layers)
    ]
    total = kv_cache_bytes_per_block(model_config, cache_config.block_size, dtype)
    logger.info(
        "allocated KV cache: %d layers x %s %s on %s (%.1f MiB, %d tokens)",
        model_config.num_layers,
        list(shape),
        dtype,
        device,
        total * cache_config.num_blocks / (1 << 20),
        cache_config.num_usable_blocks * cache_config.block_size,
    )
    return caches
