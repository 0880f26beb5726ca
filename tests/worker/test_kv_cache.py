"""KV cache sizing: bytes per block from the backend's layout, the auto budget, the
2-block minimum (block 0 is the null block), and no Request objects in worker/."""

from __future__ import annotations

import ast
import pathlib
from types import SimpleNamespace

import pytest
import torch

import pagedserve.worker
from pagedserve.attention.backend import get_attn_backend
from pagedserve.config import KVCacheConfig
from pagedserve.worker import kv_cache
from pagedserve.worker.kv_cache import (
    MIN_KV_CACHE_BYTES,
    auto_kv_cache_memory_bytes,
    determine_kv_cache_config,
    kv_cache_bytes_per_block,
    make_kv_cache_config,
)

GiB = 1 << 30
MiB = 1 << 20


def test_bytes_per_block_follow_the_backend_layout() -> None:
    model_config = SimpleNamespace(num_layers=3, num_kv_heads=2, head_dim=8)

    class WideBackend:
        """A backend whose layout pads every block with 16 extra slots."""

        @staticmethod
        def get_kv_cache_shape(
            num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int
        ) -> tuple[int, ...]:
            return (2, num_blocks, block_size + 16, num_kv_heads, head_dim)

    torch_bytes = kv_cache_bytes_per_block(
        get_attn_backend(), model_config, 16, torch.float32  # type: ignore[arg-type]
    )
    assert torch_bytes == 3 * 2 * 16 * 2 * 8 * 4
    wide_bytes = kv_cache_bytes_per_block(
        WideBackend(), model_config, 16, torch.bfloat16  # type: ignore[arg-type]
    )
    assert wide_bytes == 3 * 2 * 32 * 2 * 8 * 2


def test_auto_budget_policy() -> None:
    # CPU: 20% of free memory, at most 4 GiB.
    assert auto_kv_cache_memory_bytes(10 * GiB, False, 100 * GiB) == 2 * GiB
    assert auto_kv_cache_memory_bytes(100 * GiB, False, 100 * GiB) == 4 * GiB
    # CUDA: half the free device memory.
    assert auto_kv_cache_memory_bytes(100 * GiB, True, 100 * GiB) == 50 * GiB
    # Never more than max_num_seqs full-length sequences need, never under 64 MiB.
    assert auto_kv_cache_memory_bytes(100 * GiB, True, 300 * MiB) == 300 * MiB
    assert auto_kv_cache_memory_bytes(100 * MiB, False, 100 * GiB) == MIN_KV_CACHE_BYTES


def test_make_kv_cache_config_whole_blocks() -> None:
    config = make_kv_cache_config(block_size=16, bytes_per_block=1000, kv_cache_memory_bytes=10_999)
    assert config == KVCacheConfig(
        num_blocks=10, block_size=16, bytes_per_block=1000, kv_cache_memory_bytes=10_000
    )
    assert config.num_usable_blocks == 9 and config.num_tokens == 9 * 16


@pytest.mark.parametrize("budget", [1, 1999])
def test_tiny_kv_budget_is_a_clear_value_error(budget: int) -> None:
    with pytest.raises(ValueError, match="raise kv_cache_memory") as info:
        make_kv_cache_config(block_size=16, bytes_per_block=1000, kv_cache_memory_bytes=budget)
    assert "null block" in str(info.value) and "2000 bytes" in str(info.value)


def test_auto_budget_uses_memory_free_now(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kv_cache.platform, "available_memory_bytes", lambda: 10 * GiB)
    monkeypatch.setattr(kv_cache.platform, "is_cuda", lambda: False)
    config = determine_kv_cache_config(
        None, block_size=16, bytes_per_block=MiB, max_num_seqs=1000, max_model_len=4096
    )
    assert config.kv_cache_memory_bytes == 2 * GiB  # 20% of what is free now
    # A small workload needs only (2 seqs x 4 blocks + the null block) blocks.
    config = determine_kv_cache_config(
        None, block_size=16, bytes_per_block=MiB, max_num_seqs=2, max_model_len=64
    )
    assert config.num_blocks == 64  # the 64 MiB minimum wins over 9 blocks
    # A given budget is taken as it is.
    config = determine_kv_cache_config(
        5 * MiB, block_size=16, bytes_per_block=MiB, max_num_seqs=2, max_model_len=64
    )
    assert config.num_blocks == 5


def test_worker_does_not_import_core_request() -> None:
    """The runner works from the scheduler's plain data, never from Request objects."""
    folder = pathlib.Path(pagedserve.worker.__file__).parent
    for path in folder.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                assert node.module != "pagedserve.core.request", path.name
