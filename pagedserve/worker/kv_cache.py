"""Paged KV cache sizing and allocation, done in the engine core after the model loads.

The size comes from where the memory is: the attention backend declares one layer's
cache shape, which gives the bytes of one block; the budget is the user's
``kv_cache_memory``, or a share of the memory free now, in this process, on this
device. The result is a :class:`~pagedserve.config.KVCacheConfig`.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

import torch

from pagedserve import platform
from pagedserve.config import KVCacheConfig, ModelConfig

if TYPE_CHECKING:
    from pagedserve.attention.backend import AttentionBackend

logger = logging.getLogger(__name__)

# The share of free memory the KV cache takes when kv_cache_memory is not given, and
# its bounds: CPU memory is shared with everything else on the machine, so take less
# and cap it; on CUDA the device is the engine's.
DEFAULT_KV_SHARE_CPU = 0.2
DEFAULT_KV_MAX_CPU = 4 << 30
DEFAULT_KV_SHARE_CUDA = 0.5
MIN_KV_CACHE_BYTES = 64 << 20


def kv_cache_bytes_per_block(
    backend: AttentionBackend, model_config: ModelConfig, block_size: int, dtype: torch.dtype
) -> int:
    """Bytes one block takes across all layers, from the backend's declared layout."""
    shape = backend.get_kv_cache_shape(1, block_size, model_config.num_kv_heads, model_config.head_dim)
    itemsize = torch.empty((), dtype=dtype).element_size()
    return model_config.num_layers * math.prod(shape) * itemsize


def auto_kv_cache_memory_bytes(available_bytes: int, on_cuda: bool, max_useful_bytes: int) -> int:
    """The default budget: a share of ``available_bytes`` (CUDA 50%; CPU 20%, at most
    4 GiB), never more than ``max_useful_bytes``, and at least 64 MiB."""
    if on_cuda:
        share = int(available_bytes * DEFAULT_KV_SHARE_CUDA)
    else:
        share = min(int(available_bytes * DEFAULT_KV_SHARE_CPU), DEFAULT_KV_MAX_CPU)
    return max(min(share, max_useful_bytes), MIN_KV_CACHE_BYTES)


def make_kv_cache_config(
    block_size: int, bytes_per_block: int, kv_cache_memory_bytes: int
) -> KVCacheConfig:
    """As many whole blocks as the budget holds; at least 2 (block 0 is the null block)."""
    num_blocks = kv_cache_memory_bytes // bytes_per_block
    if num_blocks < 2:
        raise ValueError(
            f"kv_cache_memory={kv_cache_memory_bytes} bytes holds {num_blocks} KV cache "
            f"block(s) of {bytes_per_block} bytes ({block_size} tokens); at least 2 are "
            f"needed (block 0 is the reserved null block): raise kv_cache_memory to at "
            f"least {2 * bytes_per_block} bytes"
        )
    return KVCacheConfig(
        num_blocks=num_blocks,
        block_size=block_size,
        bytes_per_block=bytes_per_block,
        kv_cache_memory_bytes=num_blocks * bytes_per_block,
    )


def determine_kv_cache_config(
    kv_cache_memory_bytes: int | None,
    block_size: int,
    bytes_per_block: int,
    max_num_seqs: int,
    max_model_len: int,
) -> KVCacheConfig:
    """Size the cache: the given budget, or (None) the auto policy on the memory free now.

    Call it after the model is loaded, in the process that holds the cache.
    """
    if kv_cache_memory_bytes is None:
        # No point reserving more than max_num_seqs full-length sequences can use.
        max_useful_blocks = max_num_seqs * -(-max_model_len // block_size) + 1
        available = platform.available_memory_bytes()
        kv_cache_memory_bytes = auto_kv_cache_memory_bytes(
            available, platform.is_cuda(), max_useful_blocks * bytes_per_block
        )
        logger.info(
            "KV cache budget: %.1f MiB (auto, %.1f MiB free on %s)",
            kv_cache_memory_bytes / (1 << 20), available / (1 << 20), platform.device(),
        )
    return make_kv_cache_config(block_size, bytes_per_block, kv_cache_memory_bytes)


def allocate_kv_caches(
    backend: AttentionBackend,
    model_config: ModelConfig,
    kv_cache_config: KVCacheConfig,
    dtype: torch.dtype,
    device: torch.device,
) -> list[torch.Tensor]:
    """One zeroed cache tensor per layer, shaped as the backend declares."""
    shape = backend.get_kv_cache_shape(
        kv_cache_config.num_blocks,
        kv_cache_config.block_size,
        model_config.num_kv_heads,
        model_config.head_dim,
    )
    caches = [
        torch.zeros(shape, dtype=dtype, device=device) for _ in range(model_config.num_layers)
    ]
    logger.info(
        "allocated KV cache: %d layers x %s %s on %s (%.1f MiB, %d tokens)",
        model_config.num_layers,
        list(shape),
        dtype,
        device,
        kv_cache_config.kv_cache_memory_bytes / (1 << 20),
        kv_cache_config.num_tokens,
    )
    return caches
